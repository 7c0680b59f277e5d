"""The weights' memory layout for decoding on a CPU.

`torch.nn.Linear` keeps its weight as ``[out, in]`` and computes
``x @ weight.T``. On the CPU, with the few rows a decode step feeds (one per
reply being written), the matrix product over that transposed view is much
slower than the same product over a weight laid out ``[in, out]``:
`benchmarks/bench_matmul.py` ("Linear layouts" in docs/benchmarks.md)
measures it, about a third of a decode step at 8 rows on the Qwen2.5-0.5B
shape. `transpose_for_decoding` stores every float32 linear weight as
``[in, out]`` and hands the module the transposed view of it, so the module,
peft's LoRA layers around it, tied embeddings and the outputs are unchanged;
only the kernel the product runs through is. It allocates no second copy
(one weight at a time is rewritten).

Serving only: the training processes load their own copy of the weights,
and on a GPU cuBLAS reads either layout at full speed, so nothing is
changed there. Nothing in the ecosystem does this for plain `transformers`
models on a CPU short of Intel's extension (IPEX), whose weight prepacking
is the same idea for its own kernels and is not a dependency here.
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
