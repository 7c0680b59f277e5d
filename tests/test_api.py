import json

import httpx
import pytest

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat(client, messages=HELLO, **extra):
    r = client.post("/v1/chat/completions", json={"messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_completion_is_stored_under_its_id(client, store):
    body = chat(client, max_tokens=5, temperature=0.0, user="ann")
    row = store.get_response(body["id"])
    assert row is not None
    assert body["object"] == "chat.completion" and body["model"] == "v0" == row["model_version"]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": row["reply"]}
    assert row["prompt"] == HELLO and row["user"] == "ann"
    assert row["generation"]["max_new_tokens"] == 5 and row["generation"]["temperature"] == 0.0
    assert body["usage"]["completion_tokens"] == row["completion_tokens"] <= 5
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_streamed_completion_sends_chunks_with_the_stored_id(client, store):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": HELLO, "stream": True, "max_tokens": 8}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    row = store.get_response(ids.pop())
    assert row["reply"] == text.strip()


def test_thumbs_up_then_down_then_comment_are_three_rows(client, store):
    rid = chat(client)["id"]
    for value, comment in ((1, None), (-1, None), (-1, "say hello back")):
        r = client.post("/v1/feedback", json={"response_id": rid, "value": value, "comment": comment})
        assert r.status_code == 200, r.text
        assert r.json()["response_id"] == rid
    rows = store.feedback_since(0)
    assert [(r["response_id"], r["value"], r["comment"]) for r in rows] == [
        (rid, 1, None), (rid, -1, None), (rid, -1, "say hello back")]
    assert [e["label"] for e in store.unpaired_examples()] == [False]


def test_regenerating_the_same_turn_gives_a_pair(client, store):
    first, second = chat(client, temperature=1.0)["id"], chat(client, temperature=1.0)["id"]
    assert first != second
    client.post("/v1/feedback", json={"response_id": first, "value": 1})
    client.post("/v1/feedback", json={"response_id": second, "value": -1})
    a, b = store.get_response(first)["reply"], store.get_response(second)["reply"]
    pairs = store.preference_pairs()
    assert pairs == ([] if a == b else [{
        "prompt": HELLO,
        "chosen": [{"role": "assistant", "content": a}],
        "rejected": [{"role": "assistant", "content": b}],
    }])


def test_models_lists_the_active_version(client):
    body = client.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["v0"]


BAD_CHAT = [
    ("malformed JSON", b'{"messages": [', "JSON"),
    ("not an object", b'[1, 2]', "valid dictionary"),
    ("no messages", {}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("temperature out of range", {"messages": HELLO, "temperature": 5}, "temperature"),
    ("top_p out of range", {"messages": HELLO, "top_p": 0}, "top_p"),
    ("max_tokens zero", {"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ("max_tokens over the server's limit", {"messages": HELLO, "max_tokens": 100000}, "max_tokens"),
    ("max_tokens not a number", {"messages": HELLO, "max_tokens": "many"}, "max_tokens"),
    ("empty user message", {"messages": [{"role": "user", "content": "   "}]}, "empty"),
    ("last message from the assistant", {"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    ("message over the limit", {"messages": [{"role": "user", "content": "x" * 501}]}, "limit"),
]


@pytest.mark.parametrize("name,payload,needle", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_requests_get_a_4xx_with_a_message(client, store, name, payload, needle):
    if isinstance(payload, bytes):
        r = client.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=payload)
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    assert needle.lower() in r.json()["error"]["message"].lower(), r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert store.counts()["responses"] == 0
    chat(client)  # and the server keeps serving


BAD_FEEDBACK = [
    ("value 2", {"value": 2}, 400, "value"),
    ("value 0", {"value": 0}, 400, "value"),
    ("value true", {"value": True}, 400, "value"),
    ("value as text", {"value": "1"}, 400, "value"),
    ("missing value", {"value": None}, 400, "value"),
    ("unknown response id", {"response_id": "resp-nope", "value": 1}, 404, "resp-nope"),
    ("extra field", {"value": 1, "stars": 5}, 400, "stars"),
]


@pytest.mark.parametrize("name,patch,status,needle", BAD_FEEDBACK, ids=[b[0] for b in BAD_FEEDBACK])
def test_bad_feedback_gets_a_4xx_and_stores_nothing(client, store, name, patch, status, needle):
    rid = chat(client)["id"]
    payload = {"response_id": rid, **patch}
    payload = {k: v for k, v in payload.items() if v is not None}
    r = client.post("/v1/feedback", json=payload)
    assert r.status_code == status, r.text
    assert needle.lower() in r.json()["error"]["message"].lower()
    assert store.feedback_since(0) == []
    assert client.post("/v1/feedback", json={"response_id": rid, "value": 1}).status_code == 200


def test_openai_client_works_against_the_server(server, store):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="v0", messages=HELLO, max_tokens=6)
    assert store.get_response(reply.id)["reply"] == reply.choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(model="v0", messages=HELLO, max_tokens=6, stream=True)
    )
    assert isinstance(streamed, str)


def test_a_lone_surrogate_is_a_400_and_stores_nothing(client, store):
    body = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    rid = chat(client, max_tokens=3)["id"]
    body = ('{"response_id": "%s", "value": 1, "comment": "\\udfff"}' % rid).encode()
    r = client.post("/v1/feedback", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("comment:")
    assert store.counts()["feedback"] == 0 and store.counts()["responses"] == 1


def test_a_vanishing_temperature_answers_greedily(client):
    tiny = chat(client, max_tokens=6, temperature=1e-300)
    greedy = chat(client, max_tokens=6, temperature=0.0)
    assert tiny["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/feedback"])
def test_a_body_that_is_not_utf8_gets_an_openai_error(client, store, path):
    body = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "not valid UTF-8" in error["message"]
    assert store.counts()["responses"] == 0


def test_the_schema_documents_the_errors_the_server_sends(client):
    schema = client.get("/v1/openapi.json").json()
    operations = [op for ops in schema["paths"].values() for op in ops.values()]
    assert operations and all("422" not in op["responses"] for op in operations)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = schema["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "413", "503"):
        assert chat[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    # and the server sends what the schema says
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_an_unknown_route_under_v1_is_an_openai_404(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
