"""Loading the policy's base model and tokenizer.

Any Hugging Face causal LM can be named, by hub id or local path; the name
``starter`` means the small offline model built from the dialogue corpus
(see `chatbot.starter`). Failures become a `ModelLoadError` whose one-line
message names what was tried, never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STARTER = "starter"

# Used when a tokenizer ships no chat template of its own (base models,
# GPT-2 style checkpoints): a plain "Role: text" transcript.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- else -%}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


MIN_TEMPERATURE = 0.01  # below it, a reply is greedy


@dataclass
class GenerationSettings:
    """How the bot samples a reply. Serving and the training rollouts build
    their `transformers.GenerationConfig` from the same settings
    (`generation_config`), so what is trained is what is served."""

    max_new_tokens: int = 96  # reply length cap, in tokens
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.95  # nucleus sampling
    system_prompt: str = ""  # prepended as a system message when not empty
    # An adapter version draws only words the base would serve at the same
    # place (`served_probs`); docs/learning.md, "Served within the base's words".
    within_base: bool = True

    def validate(self) -> "GenerationSettings":
        if not 1 <= int(self.max_new_tokens) <= 4096:
            raise ValueError("max_new_tokens must be between 1 and 4096")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError("top_p must be greater than 0 and at most 1")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def sampling(self) -> bool:
        """Whether replies are sampled; below `MIN_TEMPERATURE` they are greedy,
        the limit of sampling as the temperature goes to 0 (dividing the
        logits by 1e-300 would overflow them)."""
        return float(self.temperature) >= MIN_TEMPERATURE

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probabilities of sampled replies are taken at
        (1 for greedy replies)."""
        return float(self.temperature) if self.sampling else 1.0

    def next_token_probs(self, logits):
        """The distribution a token is drawn from, given a model's next-token
        logits (rows x vocabulary, or more leading dimensions): the
        temperature, then the nucleus (the warpers `generate` applies, in its
        order); one-hot on the arg-max for greedy settings. The serving
        engine draws from it, and the gate's language figure is taken over it."""
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        if not self.sampling:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        flat = TemperatureLogitsWarper(float(self.temperature))(None, logits.reshape(-1, logits.shape[-1]))
        if float(self.top_p) < 1.0:
            flat = TopPLogitsWarper(float(self.top_p))(None, flat)
        return torch.softmax(flat, dim=-1).view_as(logits)

    def base_nucleus(self, base_logits):
        """Where the base itself could serve each token: its nucleus at these
        settings (at temperature 1 for greedy settings, whose own choice is a
        single token). A boolean mask shaped like `base_logits`."""
        if self.sampling:
            return self.next_token_probs(base_logits) > 0
        return GenerationSettings(temperature=1.0, top_p=self.top_p).next_token_probs(base_logits) > 0

    def restrict(self, logits, base_logits):
        """A version's `logits` with every token masked (-inf) that it may not
        draw: those outside the base's nucleus (`base_nucleus`) and, when
        sampling, those outside the version's own nucleus; where the two
        nuclei share no token, the base's alone. Temperature is left to the
        caller (`served_probs`, or `generate`'s own warper)."""
        import torch

        keep = self.base_nucleus(base_logits)
        if self.sampling:
            both = keep & (self.next_token_probs(logits) > 0)
            keep = torch.where(both.any(-1, keepdim=True), both, keep)
        return logits.masked_fill(~keep, float("-inf"))

    def served_probs(self, logits, base_logits=None):
        """The distribution a version draws its next token from, given its
        logits and the base's at the same place: `next_token_probs` within
        the base's words (`restrict`, then the temperature; the arg-max for
        greedy settings). Without `base_logits` (the base itself) or with
        `within_base` off, `next_token_probs`.

        Why: a version trained on a few hundred thumbs spends most of the
        language it loses on words the base would never serve at that place
        (made-up words, babble); drawing only among the base's own words
        keeps its taste and most of that language (docs/learning.md)."""
        import torch

        if base_logits is None or not self.within_base:
            return self.next_token_probs(logits)
        masked = self.restrict(logits, base_logits)
        if not self.sampling:
            return torch.nn.functional.one_hot(masked.argmax(-1), logits.shape[-1]).to(logits.dtype)
        return torch.softmax(masked / float(self.temperature), dim=-1)

    def generation_config(self, tokenizer):
        """The one `GenerationConfig` a reply is sampled with, every field set.

        transformers fills any field left unset (None) from the model's own
        ``generation_config.json`` (a checkpoint may ship top_k 20, a
        repetition penalty, min_p ...). Every sampling field is set here, to
        these settings or to "off", so no checkpoint default applies to
        serving and not to training, or the other way round.
        """
        from transformers import GenerationConfig

        sampling = self.sampling
        return GenerationConfig(
            max_new_tokens=int(self.max_new_tokens), min_new_tokens=0,
            do_sample=sampling, num_beams=1, num_return_sequences=1,
            temperature=float(self.temperature) if sampling else 1.0,
            top_p=float(self.top_p) if sampling else 1.0,
            top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
        )


def forward_arguments(model) -> tuple[str, dict]:
    """How `model`'s forward takes a KV cache (``cache`` in newer
    transformers, ``past_key_values`` before) and the keyword that computes
    only the last position's logits, where it has one."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values",
            {"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


class ModelLoadError(RuntimeError):
    """The named model could not be loaded; the message says what was tried."""


QUANTIZE = ("none", "8bit", "4bit")


def quantization_config(quantize: str, device):
    """A `BitsAndBytesConfig` for 8-bit or 4-bit (NF4, bf16 compute) loading of
    the base; None for "none". Clear errors when it cannot work here."""
    if quantize in (None, "none"):
        return None
    if quantize not in QUANTIZE:
        raise ModelLoadError(f"unknown --quantize {quantize!r}: use none, 8bit or 4bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"--quantize {quantize} needs the bitsandbytes package, which is not installed: "
            "pip install -e '.[quantize]' (or pip install bitsandbytes)") from None
    if device.type != "cuda":
        raise ModelLoadError(f"--quantize {quantize} needs a CUDA GPU; this model would load on {device}")
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=default_dtype(device) if device.type == "cuda" else torch.float32)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    path: str
    device: Any
    dtype: Any


def resolve_device(device: str = "auto"):
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is visible")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return resolved


def default_dtype(device):
    """bf16 on a GPU that supports it, float16 on an older GPU, float32 on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def ensure_chat_template(tokenizer) -> None:
    """Give the tokenizer a plain template when it has none; make sure it can pad."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def resolve_model_path(name: str, data_dir: str | os.PathLike, *, build_progress=None) -> str:
    """Turn `--model` into something `from_pretrained` takes.

    ``starter`` builds the starter model on first use (minutes, with progress)
    and returns its directory; anything else is passed through as a local
    path or hub id.
    """
    if name == STARTER:
        from chatbot.starter import ensure_starter

        return str(ensure_starter(data_dir, progress=build_progress))
    return name


def load_model(
    name: str,
    data_dir: str | os.PathLike = "data",
    *,
    device: str = "auto",
    build_progress=None,
    quantize: str = "none",
) -> LoadedModel:
    """Load base model and tokenizer; raise `ModelLoadError` on failure.

    `quantize` ("8bit", "4bit") loads the base through bitsandbytes, on a GPU.
    """
    torch_device = resolve_device(device)
    quantized = quantization_config(quantize, torch_device)
    path = resolve_model_path(name, data_dir, build_progress=build_progress)
    dtype = default_dtype(torch_device)
    tokenizer = load_tokenizer(path, name=name)
    if quantized is None:
        model = _from_pretrained("AutoModelForCausalLM", path, name=name, dtype=dtype)
        model.to(torch_device)
    else:  # bitsandbytes places the weights itself
        model = _from_pretrained("AutoModelForCausalLM", path, name=name, dtype=dtype,
                                 quantization_config=quantized, device_map={"": torch_device})
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, name, path, torch_device, dtype)


def load_tokenizer(path: str, *, name: str | None = None):
    tokenizer = _from_pretrained("AutoTokenizer", path, name=name or path)
    ensure_chat_template(tokenizer)
    return tokenizer


def _from_pretrained(auto_class: str, path: str, *, name: str, **kwargs):
    import transformers

    cls = getattr(transformers, auto_class)
    local = Path(path).expanduser()
    # A hub id is "name" or "org/name"; anything else is meant as a path.
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_like_path and not local.exists():
        raise ModelLoadError(f"cannot load model {name!r}: local path {local} does not exist")
    try:
        return cls.from_pretrained(str(local) if local.exists() else path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one clear line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 300:
            reason = reason[:300] + "..."
        if local.exists():
            tried = f"local directory {local}"
        else:
            tried = f"no local path {local}, then Hugging Face Hub id {path!r} (needs network or a cached copy)"
        raise ModelLoadError(f"cannot load model {name!r}: tried {tried}: {reason}") from exc
