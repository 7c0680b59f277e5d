"""Packed passes (chatbot.packed): every row's new tokens in one row, attention
per row. Greedy replies written in packed passes, with rows joining and
leaving at different steps, equal transformers' own `generate` one prompt at
a time, also with grouped-query attention; models the packed attention does
not compute (sliding windows) are refused; a failed pass is forgotten."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def tiny_llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def generate_alone(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_passes_write_what_each_prompt_writes_alone(kv_heads):
    from chatbot import packed

    model = tiny_llama(kv_heads)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17], [18, 19, 20, 21], [22, 23, 24, 25, 26, 27]]
    lengths = [6, 9, 4, 12, 3]  # tokens each row writes: rows leave at different steps
    with torch.inference_mode():
        expected = [generate_alone(model, p, n) for p, n in zip(prompts, lengths)]
        assert packed.install(model)
        rows, running, done = packed.Rows(), [], {}
        joins = {0: [0, 1], 2: [2], 3: [3, 4]}  # prompt indices joining at each step
        for step in range(40):
            new = [{"i": i, "tokens": []} for i in joins.get(step, [])]
            if not running and not new:
                break
            plan = rows.plan([len(prompts[r["i"]]) for r in new])
            ids = [r["tokens"][-1] for r in running] + [t for r in new for t in prompts[r["i"]]]
            logits = model(input_ids=torch.tensor([ids]), position_ids=plan.positions, packed=plan, use_cache=False,
                           attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool),
                           logits_to_keep=plan.last()).logits[0]
            running += new
            for r, token in zip(running, logits.argmax(-1).tolist()):
                r["tokens"].append(token)
            keep = [k for k, r in enumerate(running) if len(r["tokens"]) < lengths[r["i"]]]
            done.update({r["i"]: r["tokens"] for r in running if len(r["tokens"]) >= lengths[r["i"]]})
            rows.keep(keep)
            running = [running[k] for k in keep]
        assert [done[i] for i in range(len(prompts))] == expected
        assert len(rows) == 0 and rows.keys == {}  # everything given back
        # The model still serves a plain call (no pass) as SDPA does.
        assert generate_alone(model, prompts[1], 5) == expected[1][:5]


def test_a_failed_pass_is_forgotten():
    from chatbot import packed

    model = tiny_llama(4)
    packed.install(model)
    rows = packed.Rows()
    with torch.inference_mode():
        first = rows.plan([3])
        model(input_ids=torch.tensor([[5, 6, 7]]), position_ids=first.positions, packed=first, use_cache=False)
        failing = rows.plan([4])
        assert rows.lengths == [4, 4]
        rows.undo(failing)
    assert rows.lengths == [3]
    assert all(t.shape[0] == 1 for t in [*rows.keys.values(), *rows.values.values()])


def test_models_with_a_sliding_window_keep_the_padded_batch():
    from transformers import LlamaConfig, Qwen2Config

    from chatbot import packed

    assert packed.supports(LlamaConfig(num_hidden_layers=2))
    sliding = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert not packed.supports(sliding)


def test_storage_grows_in_blocks_up_to_the_context_and_shrinks_as_rows_leave():
    from chatbot import packed

    model = tiny_llama(2)
    packed.install(model)
    rows = packed.Rows(limit=70)
    with torch.inference_mode():
        for new in ([65], [3]):
            plan = rows.plan(new)
            ids = [1] * len(plan.before) + [5] * sum(new)
            model(input_ids=torch.tensor([ids]), position_ids=plan.positions, packed=plan, use_cache=False)
    assert rows.lengths == [66, 3]
    assert {t.shape[2] for t in rows.keys.values()} == {70}  # a block would be 128: capped at the context
    rows.keep([1])  # the long row leaves: one block is enough for the other
    assert {t.shape[:3] for t in rows.keys.values()} == {(1, 2, 64)}


def test_a_model_whose_attention_ignores_the_pass_is_not_served_packed(monkeypatch):
    from transformers.models.llama import modeling_llama

    from chatbot import packed

    model = tiny_llama(2)
    # As custom model code would: attention that never looks at transformers' interface.
    monkeypatch.setattr(modeling_llama.ALL_ATTENTION_FUNCTIONS, "get_interface",
                        lambda name, default: modeling_llama.eager_attention_forward)
    assert not packed.install(model)
    assert model.config._attn_implementation != packed.ATTENTION  # left as it was
    monkeypatch.undo()
    assert packed.install(model) and model.config._attn_implementation == packed.ATTENTION
