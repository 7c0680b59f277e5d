"""The engine's running batch, in one of two layouts, and how a step runs on it.

`PackedBatch` (every model `chatbot.packed` supports: Llama, Qwen2,
Mistral without a sliding window, ...): one forward pass a step carries
every running reply's next token and the whole prompt of every request
joining, packed into one row with no padding; attention is per row
(`chatbot.packed`). A newcomer costs its own tokens and nothing else.

`PaddedBatch` (the others): a `transformers.DynamicCache` with one row
per reply, left-padded. Newcomers' prompts are read in a pass of their
own (left-padded to the longest, `prefill_groups`), then every row's last
token goes through the decode pass. A row that joins with a shorter
history than the batch's is padded on the left with masked positions (and
the batch is padded when the newcomer's history is longer); positions are
counted per row, so padding changes nothing a row sees. When rows leave,
their cache rows are dropped and the columns that are padding in every
remaining row are cut.

Both read at most `engine.prefill_tokens` padded prompt tokens in one pass
(`prefill_groups`), and both read newcomers' prompts one at a time after a
pass fails, so that only the request whose prompt cannot be read fails.
"""

from __future__ import annotations

from chatbot import packed


class PackedBatch:
    """Running rows in `chatbot.packed.Rows`; one pass a step."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: list = []
        self.store = packed.Rows(limit=engine.context)

    def step(self, joining: list) -> None:
        groups = prefill_groups(joining, self.engine.prefill_tokens)
        self._run(True, groups[0] if groups else [])
        for group in groups[1:]:  # more prompts than one pass reads: the others in passes of their own
            self._run(False, group)

    def _run(self, advance: bool, new: list) -> None:
        """One pass: the running rows' next tokens (if `advance`) and the
        prompts of `new`, who join the batch."""
        import torch

        engine = self.engine
        old = self.rows if advance else []
        if not old and not new:
            return
        plan = self.store.plan([len(r.ids) for r in new], advance=advance)
        ids = [r.tokens[-1] for r in old] + [t for r in new for t in r.ids]
        try:
            logits = engine._forward([*old, *new], plan.counts, plan, input_ids=torch.tensor([ids], device=engine.device),
                                     position_ids=plan.positions.to(engine.device))
        except Exception as exc:  # noqa: BLE001 - see below
            self.store.undo(plan)
            if not new:
                raise  # the running rows' own pass: the engine fails the batch
            if old or len(units(new)) > 1:  # read one at a time, so that only the request that fails fails
                self._run(advance, [])
                for unit in units(new):
                    self._run(False, unit)
            else:
                engine._end(new[0], None, exc)
            return
        self.rows = [*self.rows, *new]
        if old:
            engine.steps += 1
            engine.rows_stepped += len(old)
        engine._advance([*old, *new], engine._sample(logits, [*old, *new]))

    def drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None and r.error is None]
        if len(keep) < len(self.rows):
            self.store.keep(keep)
            self.rows = [self.rows[i] for i in keep]


class PaddedBatch:
    """Running rows in a left-padded `DynamicCache`; a prefill pass for
    newcomers, then a decode pass."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: list = []
        self.cache = self.mask = self.positions = None

    def step(self, joining: list) -> None:
        engine = self.engine
        for group in prefill_groups(joining, engine.prefill_tokens):
            try:
                self._prefill(group)
            except Exception as exc:  # noqa: BLE001 - these requests fail, the batch goes on
                if len(units(group)) == 1:
                    engine._end(group[0], None, exc)
                    continue
                for unit in units(group):  # one by one, so that only the request that fails fails
                    try:
                        self._prefill(unit)
                    except Exception as exc:  # noqa: BLE001
                        engine._end(unit[0], None, exc)
        self.drop_finished()
        if self.rows:
            self._decode()

    def _prefill(self, group: list) -> None:
        """Read the prompts of `group` in one forward pass (left-padded to the
        longest) and add their rows to the batch with their first tokens."""
        import torch
        from transformers import DynamicCache

        engine = self.engine
        width = max(len(r.ids) for r in group)
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else engine.eos_id
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in group], device=engine.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in group], device=engine.device)
        cache = DynamicCache()
        logits = engine._forward(group, None, cache, input_ids=ids, attention_mask=mask,
                                 position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        self._join(group, cache, mask)
        engine._advance(group, engine._sample(logits, group))

    def _decode(self) -> None:
        import torch

        engine, rows = self.engine, self.rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=engine.device)
        mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        logits = engine._forward(rows, None, self.cache, input_ids=ids, attention_mask=mask,
                                 position_ids=self.positions[:, None])
        self.mask = mask
        self.positions = self.positions + 1
        engine.steps += 1
        engine.rows_stepped += len(rows)
        engine._advance(rows, engine._sample(logits, rows))

    def _join(self, group: list, cache, mask) -> None:
        """Add prefilled rows to the batch, left-padding whichever is shorter."""
        import torch

        position = mask.sum(1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = list(group), cache, mask, position
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.positions = torch.cat([self.positions, position])
        self.rows = [*self.rows, *group]

    def drop_finished(self) -> None:
        import torch

        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None and r.error is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.positions = [], None, None, None
            return
        index = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.rows = [self.rows[i] for i in keep]
        padding = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row uses
        if padding:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, padding:], layer.values[:, :, padding:]
            self.mask = self.mask[:, padding:]


def prefill_groups(requests: list, budget: int) -> list[list]:
    """`requests` in order, in groups whose prompts are read in one forward
    pass: a group grows while its rows times its longest prompt stay within
    `budget` tokens (at most the longest context), so that a group's
    activations and attention never outgrow those of one prompt at the
    longest context, which the memory plan already allows for. A reply and
    its shadow (`units`) are never parted: the shadow's
    logits bound the reply's first token."""
    groups: list[list] = []
    width = 0
    for unit in units(requests):
        longest = max(width, len(unit[0].ids))
        if groups and (len(groups[-1]) + len(unit)) * longest <= budget:
            groups[-1].extend(unit)
            width = longest
        else:
            groups.append(list(unit))
            width = len(unit[0].ids)
    return groups


def units(requests: list) -> list[list]:
    """`requests` in the groups that must share every pass: a reply and its
    shadow (which follows it), or a reply alone."""
    out: list[list] = []
    for request in requests:
        if request.shadow and out and out[-1][0] is request.twin:
            out[-1].append(request)
        else:
            out.append([request])
    return out


def _pad_left(tensor, width: int, dim: int = 2):
    """`tensor` padded with zeros on the left of `dim` to `width`."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
