"""The serving layout of the weights (`chatbot.layout`): the same model, the
same outputs, no second copy, tied weights still tied."""

from __future__ import annotations


def test_weights_laid_out_in_out_give_the_same_logits_without_a_second_copy(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from chatbot.cpu import transpose_for_decoding

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()  # the output layer shares the embedding, as many chat models do
    reference.config.tie_word_embeddings = True
    reference.tie_weights()
    count = sum(p.numel() for p in model.parameters())
    changed = transpose_for_decoding(model)

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert changed == len({id(m.weight) for m in linears}) > 0
    assert all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still one tensor
    assert sum(p.numel() for p in model.parameters()) == count  # nothing copied
    ids = torch.tensor([[3, 5, 7, 9, 11], [4, 6, 8, 10, 12]])
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert transpose_for_decoding(model) == 0  # laid out once: a second call changes nothing


SERVING_SCRIPT = r"""
import os, sys, threading
from pathlib import Path
import torch
torch.set_num_threads(2)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from chatbot.cpu import own_thread
from chatbot.models import GenerationSettings, load_model
from chatbot.policy import Policy

def native():  # threads of the process that Python did not start: OpenMP's pool workers
    return len(os.listdir("/proc/self/task")) - len(threading.enumerate())

base, out = Path(sys.argv[1]), Path(sys.argv[2])
def build():  # a model and adapters large enough that their kernels run in parallel
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    for version in ("v1", "v2"):
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "model"),
                              LoraConfig(r=128, target_modules="all-linear"))
        peft.save_pretrained(out / version)
import chatbot.policy
chatbot.policy.decode_threads = lambda model: None  # the engine's kernels on two threads, as a larger model's are
before = native()
own_thread(build)
loaded = own_thread(load_model, str(out / "model"), out, device="cpu")
policy = Policy(loaded, max_batch=4)
settings = GenerationSettings(temperature=0, max_new_tokens=4)
chat = [{"role": "user", "content": "hello"}]
policy.generate(chat, settings)
done, hold = threading.Event(), threading.Event()
def operator():  # a thread that stays alive after its swaps, as the follower's and the API's do
    policy.swap_to("v1", str(out / "v1"))
    policy.check_adapter("v2", str(out / "v2"))
    policy.swap_to("v2", str(out / "v2"))
    done.set()
    hold.wait()
alive = threading.Thread(target=operator, daemon=True)
alive.start()
done.wait()
assert policy.generate(chat, settings).version == "v2"
served = native() - before
def stray():  # torch work on a living thread, as it was before own_thread
    torch.randn(1_000_000).sum()
    hold.wait()
threading.Thread(target=stray, daemon=True).start()
import time; time.sleep(0.5)
print(served, native() - before)
hold.set()
"""


def test_the_serving_process_keeps_one_openmp_pool(tiny_model_dir, tmp_path):
    """Loading, checking and swapping adapters from other threads leave the
    engine's thread the only one with an OpenMP pool (`chatbot.cpu`); a
    parallel kernel run on any other living thread would add a second."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", SERVING_SCRIPT, str(tiny_model_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served, with_stray = map(int, proc.stdout.split()[-2:])
    assert served == 1  # the engine's pool: one worker beside the engine's thread (2 threads)
    assert with_stray == 2  # the count sees a second pool when there is one


def test_a_small_model_decodes_on_one_thread_and_a_large_one_on_torchs_default(tiny_loaded):
    import torch

    from chatbot.cpu import SMALL_LAYER, decode_threads
    from chatbot.models import GenerationSettings
    from chatbot.policy import Policy

    assert decode_threads(tiny_loaded.model) == 1
    big = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(SMALL_LAYER // 1000, 1000, bias=False))
    assert decode_threads(big) is None

    seen = []
    policy = Policy(tiny_loaded)
    forward = policy.model.forward

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    policy.model.forward = counting
    try:
        policy.generate([{"role": "user", "content": "hello"}], GenerationSettings(temperature=0, max_new_tokens=4))
    finally:
        del policy.model.forward
    assert seen and set(seen) == {1}
