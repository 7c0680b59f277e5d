"""The continuous-batching engine: replies written in a shared batch are the
replies each version writes alone; a hot-swap lands between two steps of a
full batch without changing a reply mid-way; a stopped reply frees its row;
the line is bounded."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import PROMPTS, greedy_reply

GREEDY = dict(temperature=0, max_new_tokens=12)
MORE_PROMPTS = [*PROMPTS, "tell me a joke about computers and robots please", "hi", "do you like music",
                "what is the weather like today in the city where you live"]


# The batch's layouts (chatbot.batch): packed, packed with peft's own per-row
# adapters (where chatbot.lora_rows does not apply), and padded (models
# chatbot.packed does not support).
LAYOUTS = ["packed", "packed, peft per row", "padded"]


def alone(loaded, prompts):
    return {p: greedy_reply(loaded.model, loaded.tokenizer, p) for p in prompts}


def use_layout(engine, layout: str, monkeypatch) -> list:
    """Make `engine` run `layout`; returns the list of layouts it ran."""
    from chatbot.batch import PaddedBatch

    used, choose = [], engine._layout

    def chosen():
        batch = PaddedBatch(engine) if layout == "padded" else choose()
        used.append(type(batch).__name__)
        return batch

    monkeypatch.setattr(engine, "_layout", chosen)
    if layout == "packed, peft per row":
        monkeypatch.setattr(engine, "_lora_layers", lambda model, names: [])
    return used


@pytest.mark.parametrize("layout", LAYOUTS)
def test_replies_written_together_equal_those_written_alone(tiny_trained, layout, monkeypatch):
    from chatbot.models import load_model
    from chatbot.policy import GenerationSettings, Policy

    loaded = load_model(str(tiny_trained), tiny_trained, device="cpu")
    expected = alone(loaded, MORE_PROMPTS)
    policy = Policy(loaded, max_batch=4)
    used = use_layout(policy.engine, layout, monkeypatch)
    results, errors = [], []

    def client(i: int) -> None:
        prompt = MORE_PROMPTS[i % len(MORE_PROMPTS)]
        try:
            if i % 3 == 2:  # a sampled reply in the same batch, with its own settings
                policy.generate([{"role": "user", "content": prompt}], GenerationSettings(temperature=1.0))
                return
            if i % 2:
                stream = policy.stream([{"role": "user", "content": prompt}], GenerationSettings(**GREEDY))
                text = "".join(stream).strip()
                assert text == stream.result.text
            else:
                text = policy.generate([{"role": "user", "content": prompt}], GenerationSettings(**GREEDY)).text
            results.append((prompt, text))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(results) == 16
    assert [(p, t) for p, t in results if t != expected[p]] == []
    assert policy.engine.steps < 16 * 12  # rows shared steps: fewer steps than tokens
    assert set(used) == {"PaddedBatch" if layout == "padded" else "PackedBatch"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_promotion_during_a_full_batch_changes_no_reply_mid_way(tiny_trained, adapters, expected, layout,
                                                                  monkeypatch):
    from chatbot.models import load_model
    from chatbot.policy import GenerationSettings, Policy

    policy = Policy(load_model(str(tiny_trained), tiny_trained, device="cpu"), max_batch=3)
    policy.swap_to("v1", str(adapters["v1"]))
    engine = policy.engine
    used = use_layout(engine, layout, monkeypatch)
    reached, go = threading.Event(), threading.Event()
    step = engine._step

    def step_then_hold(admit):  # after the batch's second step, hold it while the promotion arrives
        step(admit)
        if engine.steps == 2:
            reached.set()
            go.wait(timeout=30)

    engine._step = step_then_hold
    results = []

    def client(prompt: str) -> None:
        reply = policy.generate([{"role": "user", "content": prompt}], GenerationSettings(**GREEDY))
        results.append((prompt, reply.version, reply.text))

    first = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    with engine.between_steps():  # all three wait in line, then join the batch in one step
        for t in first:
            t.start()
        deadline = time.monotonic() + 30
        while engine.waiting < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert reached.wait(timeout=60)
    assert engine.running == 3  # the batch is full, two tokens into every reply
    swap = threading.Thread(target=policy.swap_to, args=("v2", str(adapters["v2"])))
    swap.start()
    deadline = time.monotonic() + 10
    while not engine._pausers and time.monotonic() < deadline:
        time.sleep(0.01)
    later = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for t in later:
        t.start()
    go.set()
    for t in [*first, swap, *later]:
        t.join(timeout=60)
    assert sorted(v for _, v, _ in results) == ["v1"] * 3 + ["v2"] * 3
    assert [(p, v, t) for p, v, t in results if t != expected[v][p]] == []
    # v1 was unloaded once its last reply was written: only the serving version is loaded.
    assert policy.loaded_versions() == ["v2"]
    assert set(used) == {"PaddedBatch" if layout == "padded" else "PackedBatch"}


def test_a_stopped_reply_leaves_the_batch_and_frees_its_row(tiny_loaded):
    from chatbot.engine import Request
    from chatbot.policy import GenerationSettings, Policy

    policy = Policy(tiny_loaded, max_batch=1, max_waiting=4)
    policy.engine.eos_id = -1  # no reply ends by itself: only its cap or its stop ends it
    long = policy.engine.submit(Request([5, 6, 7], GenerationSettings(temperature=1.0, max_new_tokens=4000)))
    assert long.events.get(timeout=30) is not None  # writing
    waiting = policy.engine.submit(Request([5, 6], GenerationSettings(temperature=0, max_new_tokens=3)))
    long.stop.set()
    while waiting.events.get(timeout=30) is not None:
        pass
    assert long.finish_reason == "stopped" and len(long.tokens) < 4000
    assert waiting.finish_reason == "length" and waiting.error is None
    deadline = time.monotonic() + 10  # the row leaves at the end of the step that wrote its last token
    while policy.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert policy.engine.running == 0


def test_past_the_batch_and_the_line_a_request_is_refused(tiny_loaded):
    from chatbot.engine import Busy, Request
    from chatbot.policy import GenerationSettings, Policy

    policy = Policy(tiny_loaded, max_batch=2, max_waiting=1)
    settings = GenerationSettings(temperature=0, max_new_tokens=3)
    with policy.engine.between_steps():  # nothing moves
        taken = [policy.engine.submit(Request([5, 6], settings)) for _ in range(3)]
        assert policy.busy()
        with pytest.raises(Busy):
            policy.engine.submit(Request([5, 6], settings))
    for request in taken:
        while request.events.get(timeout=30) is not None:
            pass
        assert request.error is None
    assert not policy.busy()


def test_a_failing_forward_fails_the_batch_s_replies_and_the_engine_goes_on(tiny_loaded, monkeypatch):
    from chatbot.policy import GenerationSettings, Policy

    policy = Policy(tiny_loaded, max_batch=2)
    settings = GenerationSettings(temperature=0, max_new_tokens=3)
    forward = policy.engine._forward
    monkeypatch.setattr(policy.engine, "_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        policy.generate([{"role": "user", "content": "hi"}], settings)
    monkeypatch.setattr(policy.engine, "_forward", forward)
    assert policy.generate([{"role": "user", "content": "hi"}], settings).finish_reason in ("stop", "length")


def test_newcomers_prompts_are_read_in_one_pass_and_write_the_replies_they_write_alone(tiny_trained):
    from chatbot.engine import Request
    from chatbot.models import load_model
    from chatbot.policy import GenerationSettings, Policy
    from chatbot.prompt import encode

    loaded = load_model(str(tiny_trained), tiny_trained, device="cpu")
    expected = alone(loaded, MORE_PROMPTS)
    policy = Policy(loaded, max_batch=len(MORE_PROMPTS))
    widths = []
    forward = policy.engine._forward

    def spy(rows, counts, layout, **kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return forward(rows, counts, layout, **kwargs)

    policy.engine._forward = spy
    settings = GenerationSettings(**GREEDY)
    with policy.engine.between_steps():  # every request waits, then all join in one step
        requests = [policy.engine.submit(Request(encode(loaded.tokenizer, [{"role": "user", "content": p}]), settings))
                    for p in MORE_PROMPTS]
    for request in requests:
        while request.events.get(timeout=60) is not None:
            pass
    lengths = {len(r.ids) for r in requests}
    assert len(lengths) > 1  # prompts of different lengths share the pass, left-padded
    assert widths[0] == (1, sum(len(r.ids) for r in requests))  # one pass for all of them, packed
    replies = [loaded.tokenizer.decode(r.tokens, skip_special_tokens=True).strip() for r in requests]
    assert [(p, t) for p, t in zip(MORE_PROMPTS, replies) if t != expected[p]] == []


def test_a_request_whose_prompt_cannot_be_read_fails_alone_when_read_with_others(tiny_loaded):
    from chatbot.engine import Request
    from chatbot.policy import GenerationSettings, Policy

    policy = Policy(tiny_loaded, max_batch=3)
    forward = policy.engine._forward

    def fails_on_a_poisoned_prompt(rows, counts, layout, **kwargs):
        if any(r.ids[0] == 99 for r in rows):
            raise RuntimeError("this prompt cannot be read")
        return forward(rows, counts, layout, **kwargs)

    policy.engine._forward = fails_on_a_poisoned_prompt
    settings = GenerationSettings(temperature=0, max_new_tokens=3)
    with policy.engine.between_steps():
        requests = [policy.engine.submit(Request(ids, settings)) for ids in ([5, 6], [99, 6, 7], [5, 6, 7, 8])]
    for request in requests:
        while request.events.get(timeout=30) is not None:
            pass
    assert [r.error is None for r in requests] == [True, False, True]
    assert "cannot be read" in str(requests[1].error)
    assert [len(r.tokens) for r in (requests[0], requests[2])] == [3, 3]


def test_prefill_groups_keep_rows_times_the_longest_prompt_within_the_budget():
    import random

    from chatbot.batch import prefill_groups
    from chatbot.engine import Request

    rng = random.Random(0)
    for _ in range(200):
        requests = [Request([1] * rng.randint(1, 40), None) for _ in range(rng.randint(0, 12))]
        budget = rng.randint(1, 100)
        groups = prefill_groups(requests, budget)
        assert [r for g in groups for r in g] == requests  # every request, in order
        for group in groups:
            assert len(group) == 1 or len(group) * max(len(r.ids) for r in group) <= budget
        for first, second in zip(groups, groups[1:]):  # a group ends only where the next request would not fit
            merged = first + second[:1]
            assert len(merged) * max(len(r.ids) for r in merged) > budget
