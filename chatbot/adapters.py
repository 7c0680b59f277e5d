"""The check an adapter's files pass before its version is made active or loaded.

One function, `check_adapter`, used everywhere a version is about to serve:
the serving process runs it when an operator promotes or rolls back and
before every hot-swap (`Policy.swap_to`), and ``app.py promote``/``rollback``
run it from the command line. An adapter passes when

- ``adapter.json`` (when there is one) is a JSON object, and, in a serving
  process, names the base it serves;
- peft's ``adapter_config.json`` parses into a peft config;
- the weights file is there and reads;
- its weights are exactly those the config puts on the base, with the shapes
  that base needs;
- every value is finite (no NaN, no inf).

The shapes come from the base built on the meta device from its config (no
weights read, no memory), wrapped by peft with the adapter's config: exactly
the tensors `PeftModel` would load, whatever peft method or target modules
the adapter uses. The serving process builds it from the model class and
config it serves; the command line, which has no model loaded, from the
config of the base the adapter says it was trained on (`base_config_for`).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DESCRIPTION_FILE = "adapter.json"
PEFT_CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterLoadError(RuntimeError):
    """An adapter fails its check or could not be loaded; the version that serves is unchanged."""


class OtherBase(AdapterLoadError):
    """The adapter was trained on another base than the one this server serves:
    its files may be sound, for a server on that base."""


@dataclass
class CheckedAdapter:
    """What passed the check: ready to load without reading the files again."""

    config: Any  # the peft config, in inference mode
    weights: dict  # tensor name -> tensor, on the CPU
    description: dict = field(default_factory=dict)  # adapter.json, or {} without one


def check_adapter(version: str, path: str | os.PathLike | None, *, base_config, base_class=None,
                  served: tuple[str | None, ...] = ()) -> CheckedAdapter:
    """Read and check `version`'s adapter in directory `path` against a base.

    `base_config` is the base's transformers config and `base_class` its model
    class (default: `AutoModelForCausalLM` picks it from the config). `served`
    holds the names the serving process knows its base by (name, path); an
    adapter.json naming another base is refused. Raises `AdapterLoadError`
    with one line saying what is wrong.
    """
    directory, broken = _located(version, path)
    description = read_description(directory, broken)
    bases = {name for key in ("base_model", "base_path") if isinstance(name := description.get(key), str)}
    known = [str(name) for name in served if name]
    if known and bases and not bases & set(known):
        raise OtherBase(
            f"adapter {version} was trained on base {description.get('base_model')!r}, but this server "
            f"serves {known[0]!r}; serve that base, or promote another version")
    config = _read_peft_config(directory, broken)
    weights = _read_weights(directory, broken)
    expected = _expected_shapes(config, base_config, base_class, broken)
    _check_fits(weights, expected, broken)
    _check_finite(weights, broken)
    config.inference_mode = True
    return CheckedAdapter(config, weights, description)


def read_description(directory: Path, broken=None) -> dict:
    """adapter.json as a dict ({} when there is none); `broken` makes the error."""
    broken = broken or (lambda reason: AdapterLoadError(f"adapter in {directory}: {reason}"))
    described = directory / DESCRIPTION_FILE
    if not described.exists():
        return {}
    try:
        about = json.loads(described.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise broken(f"{DESCRIPTION_FILE} is not readable JSON ({exc})") from None
    if not isinstance(about, dict):
        raise broken(f"{DESCRIPTION_FILE} holds {type(about).__name__}, not a JSON object")
    return about


def check_on_disk(version: str, path: str | os.PathLike | None, *, base_model: str | None,
                  data_dir: str | os.PathLike) -> CheckedAdapter:
    """`check_adapter` where no model is loaded (the command line): against
    the config of the base the adapter was trained on."""
    description = read_description(*_located(version, path))
    return check_adapter(version, path, base_config=base_config_for(version, description, base_model, data_dir))


def base_config_for(version: str, description: dict, base_model: str | None, data_dir: str | os.PathLike):
    """The config of the base an adapter was trained on, read from this machine
    only (no download, no model build): its ``base_path``, else its base model's
    name (``starter``: the one in `data_dir`; a hub id: the local cache)."""
    from transformers import AutoConfig

    from chatbot.models import STARTER
    from chatbot.starter import starter_dir

    names = [description.get("base_path"), description.get("base_model"), base_model]
    tried = []
    for name in dict.fromkeys(n for n in names if isinstance(n, str) and n):
        where = str(starter_dir(data_dir)) if name == STARTER else name
        try:
            return AutoConfig.from_pretrained(where, local_files_only=True)
        except Exception:  # noqa: BLE001 - the next name may be there
            tried.append(where)
    raise AdapterLoadError(
        f"adapter {version}: cannot check it, the config of its base is not on this machine (tried "
        f"{', '.join(tried) or 'no base named'}); promote it through the running server's operator "
        f"API or console, which checks it against the model it serves")


def fingerprint(path: str | os.PathLike | None) -> tuple:
    """Names, sizes and modification times of an adapter's files: changes
    when any of them is rewritten (how a follower knows to look again)."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name) if path else []
        return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
    except OSError:
        return ()


# -- the parts ----------------------------------------------------------------


def _located(version: str, path) -> tuple[Path, Any]:
    """The adapter's directory, and how to say what is wrong with it."""
    if not path or not Path(path).is_dir():
        raise AdapterLoadError(f"adapter {version}: directory {path} does not exist")

    def broken(reason: str) -> AdapterLoadError:
        return AdapterLoadError(f"adapter {version} ({path}): {reason}")

    return Path(path), broken


def _read_peft_config(directory: Path, broken):
    from peft import PeftConfig

    file = directory / PEFT_CONFIG_FILE
    if not file.is_file():
        raise broken(f"{PEFT_CONFIG_FILE} is missing")
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise broken(f"{PEFT_CONFIG_FILE} is not readable JSON ({exc})") from None
    try:
        return PeftConfig.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001 - one clear line
        raise broken(f"{PEFT_CONFIG_FILE} is not a peft config ({_one_line(exc)})") from None


def _read_weights(directory: Path, broken) -> dict:
    from peft.utils import load_peft_weights

    if not any((directory / name).is_file() for name in WEIGHTS_FILES):
        raise broken(f"no weights file ({' or '.join(WEIGHTS_FILES)})")
    try:
        return load_peft_weights(str(directory), device="cpu")
    except Exception as exc:  # noqa: BLE001 - one clear line
        raise broken(f"cannot read the weights ({_one_line(exc)})") from None


_SHAPES: "OrderedDict[str, dict]" = OrderedDict()  # the shapes of the last few (base, adapter config) pairs
_SHAPES_KEPT = 16
_SHAPES_LOCK = threading.Lock()


def _expected_shapes(peft_config, base_config, base_class, broken) -> dict[str, tuple]:
    """Tensor name -> shape of every weight the adapter must hold on this base.

    Building the skeleton is pure Python work (tens of milliseconds on the
    starter, a quarter of a second on a 0.5B model) that holds the GIL the
    serving engine needs between its steps; every version of one run has
    the same config, so the shapes are kept per (base class, base config,
    adapter config) and built once."""
    key = json.dumps([getattr(base_class, "__qualname__", None), base_config.to_json_string(),
                      peft_config.to_dict()], sort_keys=True, default=_plain)
    with _SHAPES_LOCK:
        if key in _SHAPES:
            _SHAPES.move_to_end(key)
            return _SHAPES[key]
    shapes = _build_expected_shapes(peft_config, base_config, base_class, broken)
    with _SHAPES_LOCK:
        _SHAPES[key] = shapes
        while len(_SHAPES) > _SHAPES_KEPT:
            _SHAPES.popitem(last=False)
    return shapes


def _plain(value):
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def _build_expected_shapes(peft_config, base_config, base_class, broken) -> dict[str, tuple]:
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    config = copy.deepcopy(base_config)  # building a model may write to its config
    if hasattr(config, "quantization_config"):  # shapes are those of the unquantized layers
        del config.quantization_config
    wanted = copy.deepcopy(peft_config)
    wanted.inference_mode = True
    if hasattr(wanted, "init_lora_weights"):  # some inits (PiSSA, OLoRA) need real weights
        wanted.init_lora_weights = True
    try:
        # A device context is per thread: generation on other threads is untouched.
        # `from_config` sets torch's default dtype for the whole process while it
        # builds, so a serving process passes its model class, whose constructor
        # does not; the command line has no other thread.
        with torch.device("meta"):
            if base_class is None:
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_config(config)
            else:
                base = base_class(config)
            skeleton = PeftModel(base, wanted)
        return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(skeleton).items()}
    except Exception as exc:  # noqa: BLE001 - e.g. target modules the base does not have
        raise broken(f"its config does not fit the base ({_one_line(exc)})") from None


def _check_fits(weights: dict, expected: dict, broken) -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise broken(f"weights do not fit the base: {len(missing)} missing (e.g. {missing[:2]}), "
                     f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for name in sorted(weights):
        shape = tuple(weights[name].shape)
        if shape != expected[name]:
            raise broken(f"weights do not fit the base: {name} has shape {list(shape)}, "
                         f"the base needs {list(expected[name])}")


def _check_finite(weights: dict, broken) -> None:
    import torch

    for name in sorted(weights):
        tensor = weights[name]
        # A NaN or inf anywhere makes the sum NaN or inf; summed in float64, finite
        # values cannot overflow. One reduction, against a mask the tensor's size.
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
            bad = int((~torch.isfinite(tensor)).sum())
            raise broken(f"weights are not all finite: {name} holds {bad} NaN or inf values")


def _one_line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
