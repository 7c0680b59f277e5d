import threading

from storage import Store

THREADS, PER_THREAD = 16, 40


def test_sixteen_threads_writing_at_once_lose_nothing(data_dir):
    store = Store.in_data_dir(data_dir)
    errors, start = [], threading.Barrier(THREADS)

    def writer(n):
        try:
            start.wait()
            conv = store.start_conversation(f"sess-{n}")
            for i in range(PER_THREAD):
                rid = store.log_response(
                    conversation_id=conv,
                    prompt=[{"role": "user", "content": f"message {n}-{i}"}],
                    reply=f"reply {n}-{i}",
                    model_version="v0",
                    session_id=f"sess-{n}",
                )
                store.record_feedback(rid, 1 if i % 2 else -1, session_id=f"sess-{n}")
                if i % 5 == 0:  # a changed mind
                    store.record_feedback(rid, 1, session_id=f"sess-{n}", comment="on second thought")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    counts = Store.in_data_dir(data_dir).counts()  # a fresh connection sees it all
    changed = len(range(0, PER_THREAD, 5))
    assert counts["conversations"] == THREADS
    assert counts["responses"] == THREADS * PER_THREAD
    assert counts["feedback"] == THREADS * (PER_THREAD + changed)
    feedback_ids = [r["id"] for r in store.feedback_since(0)]
    assert feedback_ids == sorted(set(feedback_ids))
    assert len(store.unpaired_examples()) == THREADS * PER_THREAD
    store.close()
