"""One decode step with each row of the batch on its own LoRA adapter, at
nearly the cost of a step on one adapter.

While a promotion or a canary runs, the batch holds rows of two versions.
peft serves that with ``adapter_names=`` (one name per row): for each call it
registers a hook on every LoRA layer, and in every layer splits the batch by
adapter with Python lists, gathers each part and scatters the result back.
On a CPU model of a few million parameters that doubles the decode step
(the starter, 8 rows on two adapters: 7.1 ms against 3.5 ms on one;
`benchmarks/bench_mixed_batch.py`), and every reply written during a
promotion paid for it. This path: 4.5 ms.

`rows_on_adapters` does the same arithmetic without splitting the batch:
for the length of one forward pass, every adapter some row uses is active
in every LoRA layer, and each adapter's scaling (peft's ``lora_alpha / r``,
the factor its ``B(A(x))`` is multiplied by) becomes a per-row tensor that
is that factor on the rows using the adapter and 0 on the others. peft's
plain path then adds ``B_a(A_a(x)) * scale_a`` for each adapter `a`: each
row gets exactly its own adapter's term (an adapter's term on a row that
does not use it is multiplied by 0), with no gather, no scatter and no
hooks. The extra work is one small LoRA product per extra adapter on rows
that discard it; a batch holds two versions at most for the length of one
reply.

It applies to plain LoRA layers (no DoRA or other variant, no merged
weights); for anything else `supported` says no and the engine keeps
peft's ``adapter_names=`` path. Nothing is left changed: the layers' active
adapters and scalings are put back when the pass ends, also on error.
"""

from __future__ import annotations

from contextlib import contextmanager

BASE_ROW = "__base__"  # peft's name for a row on the plain base


def lora_layers(model) -> list:
    """The LoRA layers of a `PeftModel` (empty for anything else)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def supported(layers: list, names: set[str]) -> bool:
    """Whether every layer serves adapters `names` as plain, unmerged LoRA."""
    for layer in layers:
        if getattr(layer, "merged_adapters", None) or getattr(layer, "disable_adapters", False):
            return False
        for name in names:
            if name in layer.lora_A and (name in getattr(layer, "lora_variant", {})
                                         or getattr(layer, "use_dora", {}).get(name)):
                return False
    return True


@contextmanager
def rows_on_adapters(layers: list, names: list[str], per_token: bool = False):
    """Within the block, a forward pass of `layers`' model applies to row i
    the adapter ``names[i]`` (`BASE_ROW`: none); with `per_token`, to token i
    of a pass of one packed row (`chatbot.packed`). `layers`: `lora_layers`
    of the model, checked by `supported`."""
    import torch

    used = sorted({n for n in names if n != BASE_ROW})
    masks: dict[tuple, torch.Tensor] = {}  # (adapter, scaling, dtype, device) -> per-row factor

    def factor(layer, name):
        weight = layer.lora_A[name].weight
        key = (name, float(layer.scaling[name]), weight.dtype, weight.device)
        if key not in masks:
            rows = torch.tensor([n == name for n in names], dtype=weight.dtype, device=weight.device)
            masks[key] = (rows * key[1]).view((1, -1, 1) if per_token else (-1, 1, 1))
        return masks[key]

    saved = []
    try:
        for layer in layers:
            here = [n for n in used if n in layer.lora_A]
            saved.append((layer, layer._active_adapter, {n: layer.scaling[n] for n in here}))
            for name in here:
                layer.scaling[name] = factor(layer, name)
            layer._active_adapter = here
        yield
    finally:
        for layer, active, scalings in saved:
            layer._active_adapter = active
            layer.scaling.update(scalings)
