"""What serving on a CPU needs beyond the model: the weights' layout, and
one OpenMP pool.

**The weights' layout.** `torch.nn.Linear` keeps its weight as ``[out, in]``
and computes ``x @ weight.T``. On the CPU, with the few rows a decode step
feeds (one per reply being written), the matrix product over that transposed
view is much slower than the same product over a weight laid out
``[in, out]``: `benchmarks/bench_matmul.py` measures it, about a third of a
decode step at 8 rows on the Qwen2.5-0.5B shape. `transpose_for_decoding`
stores every float32 linear weight as ``[in, out]`` and hands the module the
transposed view of it, so the module, peft's LoRA layers around it, tied
embeddings and the outputs are unchanged; only the kernel the product runs
through is. It allocates no second copy (one weight at a time is
rewritten). The training processes load their own copy of the weights, and on
a GPU cuBLAS reads either layout at full speed, so nothing is changed there.
Intel's extension (IPEX) prepacks weights for its own kernels, the same idea;
it is not a dependency here.

**One thread for a small model's steps.** PyTorch splits a CPU kernel over
its intra-op threads (one per core). A matrix product of a few rows over a
layer of under a million weights takes tens of microseconds on one core,
about what handing half of it to a second OpenMP thread costs; and a server
shares its cores with its HTTP threads (and, in a benchmark, with its
clients), so a parallel region often waits for a worker that is not
running. On the starter (every layer under 200,000 weights), with load
generators that took half of both cores, the engine's thread on one
intra-op thread served 8 streaming clients at 457 tokens/s against 286 on
two; with light ones, as fast on one thread as on two (809 against 808
tokens/s, p50 79 ms against 88) at about half the CPU (docs/serving.md).
`decode_threads` says 1 for such a model and leaves larger ones, whose
products do gain from both cores, to torch.

**One OpenMP pool.** PyTorch's CPU kernels run on OpenMP, and libgomp keeps
a pool of worker threads for *each* thread that has started a parallel
region. Once the process holds more pool threads than it has CPUs, libgomp
stops letting idle workers spin between regions and puts them to sleep
(its "throttled" spin count), so every small kernel of a decode step pays a
wake-up: measured on the Qwen2.5-0.5B shape, a one-row step on the engine's
thread took 140 ms instead of 100 ms with a LoRA adapter, and 119 ms instead
of 95 ms without, as soon as one other thread had run a single parallel
reduction (docs/serving.md). The engine's thread is the one thread of the
serving process that should run the model's kernels; any other torch work
(loading the model, checking an adapter's files, adding its layers) runs in
`own_thread`: a thread started for it and ended with it, whose pool libgomp
frees when it ends.
"""

from __future__ import annotations


def transpose_for_decoding(model) -> int:
    """Lay out every float32 `torch.nn.Linear` weight of `model` (and the
    embedding that shares one) as ``[in, out]`` behind an ``[out, in]``
    view; returns how many weights changed. The module's outputs are the
    same up to float rounding."""
    import torch

    changed: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not torch.nn.Linear:  # quantized and LoRA-wrapped subclasses keep theirs
                continue
            weight = module.weight
            if weight.dtype != torch.float32 or weight.dim() != 2 or not weight.is_contiguous():
                continue
            if id(weight) not in changed:
                changed[id(weight)] = torch.nn.Parameter(weight.t().contiguous().t(),
                                                         requires_grad=weight.requires_grad)
            module.weight = changed[id(weight)]
        for module in model.modules():  # an embedding tied to a linear weight stays tied to it
            if isinstance(module, torch.nn.Embedding) and id(module.weight) in changed:
                module.weight = changed[id(module.weight)]
    return len(changed)


SMALL_LAYER = 1_000_000  # weights: below this in every linear layer, decode steps run on one thread


def decode_threads(model) -> int | None:
    """The intra-op threads for the engine's thread on a CPU: 1 when every
    linear layer of `model` holds fewer than `SMALL_LAYER` weights (see the
    module's docstring), else None (torch's default, one per core)."""
    import torch

    largest = max((m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    return 1 if largest < SMALL_LAYER else None


def own_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on a thread started for it, which ends
    with it (see the module's docstring); returns its result or raises its
    exception, in the caller."""
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"torch-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
