"""One forward pass for every row's new tokens, packed: decode and prefill together.

Each step of the engine feeds the model one new token for every reply being
written, and the whole prompt of every request joining the batch. Padded to
one rectangle, a newcomer's prompt of 30 tokens makes every other row carry
29 tokens of padding through every layer; read in a pass of its own, it
costs a second pass over the weights (on the Qwen2.5-0.5B shape on this
CPU a 14-token prompt alone costs about as much as a decode step of 8 rows:
the weights are read twice). The peer servers pack every request's tokens
into one sequence; so do we:

- the linear layers (and the LoRA adapters) see one row of T tokens, every
  running reply's next token followed by the newcomers' prompts, with no
  padding; each token's adapter is its reply's (`chatbot.lora_rows`, per
  token);
- attention is the only place where tokens of different replies must not
  meet. `attention` (registered with transformers as `ATTENTION`) writes
  the pass's keys and values into the batch's per-row storage (`Rows`) and
  attends per row: the running rows' single queries against their own
  columns in one call, the newcomers' prompts causally against their own in
  another. A call that carries no `Pass` (anything else using the model) is
  transformers' own SDPA attention, mask included.

Why not transformers' `ContinuousBatchingManager`, which packs the same way
with paged attention: it owns its loop and its batch, and gives no hook for
the per-token adapter a row is bound to (docs/serving.md). Why not a KV
`Cache` subclass: the cache's `update` returns one key tensor per layer,
while per-row attention needs the pass's layout; the attention function
receives both.

Supported: models whose attention goes through transformers' attention
interface with full causal attention (Llama, Qwen2, Mistral without a
sliding window, ...). `supports` says no for sliding windows and
soft-capped attention; the engine then keeps its padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = "chatbot_packed"
_COLUMNS = 64  # storage grows by whole blocks of this many columns


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, packed=None,
              **kwargs):
    """transformers' attention function under the name `ATTENTION`: with a
    `Pass` (keyword ``packed``) the per-row attention of a packed pass, else
    SDPA."""
    if packed is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return packed.attend(module, query, key, value, scaling), None


def install(model) -> bool:
    """Route `model`'s attention through `attention` where `supports` says
    it can and a probe agrees (`_probe`); returns whether it does. A model
    that fails the probe is left as it was."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports(base.config):
        return False
    if base.config._attn_implementation == ATTENTION:
        return True
    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    before = base.config._attn_implementation
    base.set_attn_implementation(ATTENTION)
    if _probe(model):
        return True
    base.set_attn_implementation(before)
    return False


def _probe(model) -> bool:
    """Whether packed passes give `model` the logits a plain forward pass
    gives: a prompt of two tokens, then one more token. A model whose
    attention does not go through transformers' attention interface (custom
    code) would ignore the pass's layout and read the packed row as one
    sequence: it fails here, not in a reply."""
    import inspect

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values()):
        return False
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3]], device=device)
    rows, calls = Rows(), []
    try:
        with torch.inference_mode():
            plain = model(input_ids=ids).logits[0, 1:].float()
            packed_logits = []
            for plan, step in ((rows.plan([2]), ids[:, :2]), (rows.plan([]), ids[:, 2:])):
                plan.calls = calls
                out = model(input_ids=step, position_ids=plan.positions.to(device), packed=plan, use_cache=False,
                            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)).logits
                packed_logits.append(out[0, -1].float())
    except Exception:  # noqa: BLE001 - any failure means the model cannot be served packed
        return False
    scale = plain.abs().max().clamp(min=1.0)
    return bool(calls) and torch.allclose(torch.stack(packed_logits), plain, atol=1e-3 * float(scale), rtol=1e-3)


def supports(config) -> bool:
    """Whether every layer of a model with `config` attends fully and
    causally, without soft-capping (what `attention` computes)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False) or getattr(text, "attn_logit_softcapping", None):
        return False
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or []):
        return False
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    # The implementations whose arithmetic `attention` reproduces (None: not yet chosen, SDPA).
    return getattr(text, "_attn_implementation", None) in (None, "sdpa", "eager", "flash_attention_2",
                                                           "flash_attention_3", ATTENTION)


class Rows:
    """The batch's keys and values, one storage row per reply: for each
    layer a key and a value tensor [rows, kv heads, capacity, head dim],
    row r's tokens in columns 0 .. lengths[r] - 1 (no padding in front;
    columns past a row's length are never attended). Storage grows by
    blocks of columns, never past `limit` (the longest a row gets: the
    memory plan's context), and shrinks as rows leave."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.keys: dict[int, object] = {}
        self.values: dict[int, object] = {}
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def keep(self, index: list[int]) -> None:
        """Keep only rows `index` (in that order); columns no kept row uses
        are given back."""
        import torch

        self.lengths = [self.lengths[i] for i in index]
        if not index:
            self.keys, self.values = {}, {}
            return
        width = self.columns(max(self.lengths))
        for store in (self.keys, self.values):
            for layer, tensor in store.items():
                rows = torch.tensor([i for i in index if i < tensor.shape[0]], device=tensor.device)
                store[layer] = tensor[:, :, :width].index_select(0, rows)

    def columns(self, needed: int) -> int:
        """Storage columns for rows of at most `needed` tokens."""
        width = -(-needed // _COLUMNS) * _COLUMNS
        return max(needed, min(width, self.limit)) if self.limit else width

    def plan(self, new: list[int], advance: bool = True) -> "Pass":
        """The layout of a pass in which the rows now in the batch get one
        token each (unless not `advance`) and `new` rows join with prompts
        of these lengths: the old rows' tokens first, then each newcomer's
        prompt. Lengths are updated as if the pass ran; `undo` puts them
        back when it did not."""
        before = list(self.lengths)
        pass_ = Pass(self, before if advance else [], len(before), list(new))
        self.lengths = [n + 1 for n in before] if advance else before
        self.lengths += list(new)
        return pass_

    def undo(self, pass_: "Pass") -> None:
        """Forget a pass that failed: lengths as they were, its newcomers'
        rows gone."""
        self.lengths = self.lengths[: pass_.base]
        self.lengths[: pass_.old] = pass_.before
        self.keep(list(range(pass_.base)))


@dataclass
class Pass:
    """One packed forward pass: each of the batch's first `old` rows (with
    `before` tokens each) gets one token, then newcomers join as rows
    `base`, `base` + 1, ... with `new` prompt tokens each.

    With `as_rows`, the model sees the pass as T rows of one token each
    instead of one row of T tokens (for peft's per-row adapters where
    `chatbot.lora_rows` does not apply); attention is the same."""

    rows: Rows
    before: list[int]
    base: int
    new: list[int]
    as_rows: bool = False
    calls: list | None = None  # where given, each layer's attention call is noted (`_probe`)

    def __post_init__(self):
        import torch

        self.old = len(self.before)
        self._device = self._moved = None  # see `_on`
        self.counts = [1] * self.old + self.new  # tokens per row, in the pass's order
        self.tokens = sum(self.counts)
        positions = list(self.before)
        for n in self.new:
            positions.extend(range(n))
        self.positions = torch.tensor([positions])
        # Where each token's key and value go: storage row and column.
        self._row = torch.tensor(list(range(self.old)) + [self.base + i for i, n in enumerate(self.new)
                                                          for _ in range(n)])
        self._col = self.positions[0]
        self.width = max([n + 1 for n in self.before] + self.new)  # columns the pass needs
        self._old_mask = None  # the old rows attend to their columns below their new length
        if self.old and min(self.before) != max(self.before):
            lengths = torch.tensor(self.before) + 1
            self._old_mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None])[:, None, None, :]
        self._longest = max(self.new, default=0)  # newcomers' prompts, right-padded: token j of row i at [i, j]
        if self.new:
            starts = [self.old + sum(self.new[:i]) for i in range(len(self.new))]
            self._new_index = torch.tensor([[s + min(j, n - 1) for j in range(self._longest)]
                                            for s, n in zip(starts, self.new)])
            self._new_valid = torch.tensor([[j < n for j in range(self._longest)] for n in self.new])

    def last(self):
        """Index of each row's last token in the pass (where its next-token
        logits are)."""
        import torch

        return torch.tensor(self.counts).cumsum(0) - 1

    def _storage(self, layer: int, like):
        """Layer `layer`'s key and value storage, with room for this pass."""
        rows = len(self.rows)
        keys = self.rows.keys.get(layer)
        if keys is None or keys.shape[0] != rows or keys.shape[2] < self.width:
            width = max(self.rows.columns(self.width), 0 if keys is None else keys.shape[2])
            for store in (self.rows.keys, self.rows.values):
                grown = like.new_zeros((rows, like.shape[1], width, like.shape[3]))
                held = store.get(layer)
                if held is not None:
                    grown[: held.shape[0], :, : held.shape[2]] = held
                store[layer] = grown
        return self.rows.keys[layer], self.rows.values[layer]

    def _on(self, device) -> dict:
        """The pass's index tensors on `device`, moved once for all layers."""
        if self._device != device:
            tensors = {"row": self._row, "col": self._col, "old_mask": self._old_mask}
            if self.new:
                tensors.update(new_index=self._new_index, new_valid=self._new_valid)
            self._moved = {k: None if t is None else t.to(device) for k, t in tensors.items()}
            self._device = device
        return self._moved

    def attend(self, module, query, key, value, scaling):
        """Attention of the pass's `query` [1, heads, T, dim] (or [T, heads,
        1, dim] `as_rows`): store the pass's keys and values, then attend
        per row. Returns [1, T, heads, dim] (or [T, 1, heads, dim])."""
        import torch
        import torch.nn.functional as F

        if self.calls is not None:
            self.calls.append(module.layer_idx)
        if self.as_rows:
            query, key, value = (t.transpose(0, 2) for t in (query, key, value))
        if query.shape[0] != 1 or query.shape[2] != self.tokens:
            raise ValueError(f"a packed pass expects one row of {self.tokens} tokens, got {tuple(query.shape)}")
        keys, values = self._storage(module.layer_idx, key)
        on = self._on(query.device)
        keys[on["row"], :, on["col"]] = key[0].transpose(0, 1).to(keys.dtype)
        values[on["row"], :, on["col"]] = value[0].transpose(0, 1).to(values.dtype)
        gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
        out = []
        if self.old:
            span = max(self.before) + 1
            q = query[0, :, : self.old].transpose(0, 1).unsqueeze(2)  # [old, heads, 1, dim]
            o = F.scaled_dot_product_attention(q, keys[: self.old, :, :span], values[: self.old, :, :span],
                                               attn_mask=on["old_mask"], scale=scaling, **gqa)
            out.append(o.squeeze(2))  # [old, heads, dim]
        if self.new:
            q = query[0][:, on["new_index"]].transpose(0, 1)  # [new, heads, longest, dim]
            rows = slice(self.base, self.base + len(self.new))
            span = self._longest
            o = F.scaled_dot_product_attention(q, keys[rows, :, :span], values[rows, :, :span], is_causal=True,
                                               scale=scaling, **gqa)
            out.append(o.transpose(1, 2)[on["new_valid"]])  # [new tokens, heads, dim]
        out = (out[0] if len(out) == 1 else torch.cat(out)).unsqueeze(0)
        return out.transpose(0, 1) if self.as_rows else out
