"""The gateway end to end, through a real HTTP server: the OpenAI API as the official client and
raw HTTP see it, every bad input's 4xx in OpenAI's error shape, API keys, rate limits, a full
engine queue and a client that hangs up mid-stream.

Every HTTP call has a timeout, so a gateway bug fails a test instead of hanging the run.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest

from controlplane.access import CLI
from engine.loader import EngineConfig
from gateway.openai.service import Limits
from tests.gateway.conftest import (
    TIMEOUT,
    assert_openai_error,
    base_config,
    deployment,
    engine_stats,
    http,
    make_key,
    metric,
    openai_client,
    running,
    slow_steps,
    sse_data,
    wait_for,
)

MODEL = "tiny"
PROMPT = "The function"  # 9 tokens; the tiny model's greedy output never ends before max_tokens
MESSAGES = [{"role": "user", "content": "Return the sum."}]
# the module's gateway: bounds small enough to test against the tiny model's 128-token context
MAX_PROMPT_TOKENS = 40
MAX_TOKENS = 120
MAX_BODY = 8192


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_registry):
    """One open-access gateway for the read-only API tests of this module."""
    tmp = tmp_path_factory.mktemp("gw-api")
    limits = Limits(max_prompt_tokens=MAX_PROMPT_TOKENS, max_tokens=MAX_TOKENS)
    config = base_config(tmp, tiny_registry, limits=limits, max_body_bytes=MAX_BODY)
    with running(config) as g:
        yield g


@pytest.fixture(scope="module")
def client(gw) -> openai.OpenAI:
    return openai_client(gw)


# ── the API ──


SAMPLING = {
    "greedy": {"temperature": 0},
    "seeded": {"temperature": 1.0, "top_p": 0.95, "seed": 1234},
}


@pytest.mark.parametrize("sampling", SAMPLING)
def test_streamed_completion_text_equals_the_whole_one(client, sampling):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, **SAMPLING[sampling])
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert whole.usage.completion_tokens == 40
    if sampling == "seeded":  # the seed makes sampling repeatable, and it is sampling
        greedy = client.completions.create(**(kw | {"temperature": 0, "top_p": None}))
        assert client.completions.create(**kw).choices[0].text == whole.choices[0].text
        assert greedy.choices[0].text != whole.choices[0].text


@pytest.mark.parametrize("sampling", SAMPLING)
def test_streamed_chat_text_equals_the_whole_one(client, sampling):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=40, **SAMPLING[sampling])
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    assert streamed == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sse_usage_chunk_comes_last_and_done_ends_the_stream(gw, path):
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    body |= {"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT}
    with http(gw) as h, h.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    *choices, last = chunks
    assert all(c["usage"] is None for c in choices) and choices
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    # without include_usage no chunk carries the key at all (OpenAI's behaviour)
    body.pop("stream_options")
    with http(gw) as h, h.stream("POST", path, json=body) as r:
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])


def test_usage_counts_the_prompt_as_tokenize_does(gw, client):
    with http(gw) as h:
        by_prompt = h.post("/v1/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
        by_messages = h.post("/v1/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert completion.usage.prompt_tokens == by_prompt["count"] == 9
    assert chat.usage.prompt_tokens == by_messages["count"] > by_prompt["count"]
    for usage in (completion.usage, chat.usage):
        assert usage.completion_tokens == 3
        assert usage.total_tokens == usage.prompt_tokens + 3
    # the token ids /v1/tokenize gave are a prompt too, the same prompt
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(
        model=MODEL, prompt=by_prompt["tokens"], max_tokens=8, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == 9


def test_n_2_gives_two_choices(client):
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, n=2, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in completion.choices) == [0, 1]
    assert all(c.text for c in completion.choices)
    assert completion.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 16  # include_usage counts both choices


def test_stop_strings_end_the_text_before_them(client):
    text = (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
        .choices[0]
        .text
    )
    stop = text[6:9]
    expected = text[: text.index(stop)]
    for stream in (False, True):
        got = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "zzz"],
            stream=stream,
        )  # fmt: skip
        if stream:
            chunks = list(got)
            out = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            out, finish = got.choices[0].text, got.choices[0].finish_reason
        assert out == expected and stop not in out
        assert finish == "stop"


def test_completion_logprobs_have_one_entry_per_token(client):
    c = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy: the likeliest
        assert chosen in top
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_have_the_top_alternatives(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
              top_logprobs=2)  # fmt: skip
    c = client.chat.completions.create(**kw)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens == 5
    for token in content:
        assert token.logprob <= 0 and bytes(token.bytes).decode(errors="replace") == token.token
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]  # fmt: skip
    assert [t.token for t in streamed] == [t.token for t in content]
    without = client.chat.completions.create(**(kw | {"logprobs": None, "top_logprobs": None}))
    assert without.choices[0].logprobs is None


def test_models_lists_names_and_aliases(gw, client):
    ids = {m.id for m in client.models.list()}
    assert {"tiny", "tiny@production"} <= ids
    with http(gw) as h:
        body = h.get("/v1/models").json()
    assert body["object"] == "list"
    assert all(m["object"] == "model" and m["created"] > 0 for m in body["data"])


def test_tokenize_prompt_and_messages(gw):
    with http(gw) as h:
        r = h.post("/v1/tokenize", json={"model": MODEL, "prompt": PROMPT,
                                         "return_token_strs": True})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) == 9
        assert body["max_model_len"] == 128
        chat = h.post("/v1/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
        bare = h.post("/v1/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                            "add_generation_prompt": False}).json()  # fmt: skip
        assert chat["count"] > bare["count"] > 0
        assert_openai_error(
            h.post("/v1/tokenize", json={"model": MODEL, "prompt": "a", "messages": MESSAGES}),
            400,
        )
        assert_openai_error(h.post("/v1/tokenize", json={"prompt": "a"}), 400, param="model")
        assert_openai_error(
            h.post("/v1/tokenize", json={"model": "nope", "prompt": "a"}), 404, "model_not_found"
        )


def test_health_readiness_and_metrics(gw, client):
    with http(gw) as h:
        assert h.get("/healthz").json() == {"status": "ok"}
        before = h.get("/metrics").text
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)
        list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, stream=True))
        h.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 127})
        h.post("/v1/completions", json={"model": "made-up-name", "prompt": PROMPT})
        ready = h.get("/readyz")
        r = h.get("/metrics")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["models"] == {"tiny:1": "ok"}
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text

    def delta(sample: str, **labels) -> float:
        return metric(after, sample, **labels) - metric(before, sample, **labels)

    labels = {"model": MODEL, "endpoint": "/v1/completions"}
    assert delta("aimass_requests_total", status="200", **labels) == 2
    assert delta("aimass_requests_total", status="400", **labels) == 1
    assert delta("aimass_request_duration_seconds_count", **labels) == 3
    # a label is a name the registry resolved, never whatever a client sent
    assert delta("aimass_requests_total", model="-", status="404") == 1
    assert 'model="made-up-name"' not in after
    assert delta("aimass_time_to_first_token_seconds_count", model=MODEL) == 2
    assert delta("aimass_e2e_request_latency_seconds_count", model=MODEL) == 2
    assert delta("aimass_generation_tokens_total", model=MODEL) == 10
    assert delta("aimass_prompt_tokens_total", model=MODEL) == 18
    assert metric(after, "aimass_model_loaded", model=MODEL, version="1") == 1
    assert metric(after, "aimass_running_requests", model=MODEL) == 0
    assert metric(after, "aimass_queue_depth", model=MODEL) == 0


def test_the_openapi_schema_lists_the_routes(gw):
    with http(gw) as h:
        r = h.get("/docs/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    assert schema["info"]["title"] == "aimass gateway"
    paths = schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/tokenize"):
        assert "post" in paths[path]
    assert "get" in paths["/v1/models"] and "get" in paths["/healthz"]


def test_request_ids_are_echoed_or_generated(gw):
    with http(gw) as h:
        given = h.get("/healthz", headers={"x-request-id": "abc-123"})
        fresh = [h.get("/healthz").headers["x-request-id"] for _ in range(2)]
        error = h.post("/v1/completions", json={}, headers={"x-request-id": "err-1"})
        stream = h.post("/v1/completions", headers={"x-request-id": "s-1"},
                        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True})  # fmt: skip
    assert given.headers["x-request-id"] == "abc-123"
    assert len(fresh[0]) >= 16 and fresh[0] != fresh[1]
    assert error.status_code == 400 and error.headers["x-request-id"] == "err-1"
    assert stream.status_code == 200 and stream.headers["x-request-id"] == "s-1"


# ── bad input: a 4xx in OpenAI's shape, never a 500 ──

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": PROMPT}
OK_CHAT = {"model": MODEL, "messages": MESSAGES}
LONG_PROMPT = "hello world " * 20  # more than MAX_PROMPT_TOKENS tokens

# (id, path, body, status, code or None, param or ... for "not checked")
BAD = [
    ("unknown-field", C, OK | {"temprature": 1}, 400, "invalid_value", "temprature"),
    ("nested-unknown-field", C, OK | {"stream": True, "stream_options": {"x": 1}}, 400,
     "invalid_value", "stream_options.x"),
    ("wrong-type", C, OK | {"max_tokens": "ten"}, 400, "invalid_value", "max_tokens"),
    ("prompt-null", C, OK | {"prompt": None}, 400, "invalid_value", "prompt"),
    ("model-missing", C, {"prompt": PROMPT}, 400, "invalid_value", "model"),
    ("temperature-3", C, OK | {"temperature": 3}, 400, "invalid_value", "temperature"),
    ("top_p-0", CHAT, OK_CHAT | {"top_p": 0}, 400, "invalid_value", "top_p"),
    ("n-0", C, OK | {"n": 0}, 400, "invalid_value", "n"),
    ("n-100", CHAT, OK_CHAT | {"n": 100}, 400, "invalid_value", "n"),
    ("max_tokens-0", C, OK | {"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max_tokens-context", C, OK | {"max_tokens": MAX_TOKENS}, 400, "context_length_exceeded",
     "prompt"),
    ("max_completion_tokens-context", CHAT, OK_CHAT | {"max_completion_tokens": 115}, 400,
     "context_length_exceeded", "messages"),
    ("max_tokens-limit", C, OK | {"max_tokens": MAX_TOKENS + 1}, 400, None, "max_tokens"),
    ("prompt-too-long", C, OK | {"prompt": LONG_PROMPT}, 400, None, "prompt"),
    ("messages-too-long", CHAT, OK_CHAT | {"messages": [{"role": "user", "content": LONG_PROMPT}]},
     400, None, "messages"),
    ("prompt-empty", C, OK | {"prompt": ""}, 400, None, "prompt"),
    ("five-stops", C, OK | {"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ("no-messages", CHAT, OK_CHAT | {"messages": []}, 400, "invalid_value", "messages"),
    ("bad-role", CHAT, OK_CHAT | {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("message-without-role", CHAT, OK_CHAT | {"messages": [{"content": "hi"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("image-part", CHAT, OK_CHAT | {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, None,
     "messages[0].content[0]"),
    ("tool-message", CHAT, OK_CHAT | {"messages": [{"role": "tool", "content": "1",
                                                     "tool_call_id": "a"}]}, 400, None, ...),
    ("unknown-model", C, OK | {"model": "nope"}, 404, "model_not_found", "model"),
    ("unknown-alias", CHAT, OK_CHAT | {"model": "tiny@nosuchalias"}, 404, "model_not_found",
     "model"),
    ("unknown-version", C, OK | {"model": "tiny:99"}, 404, "model_not_found", "model"),
    ("bad-model-name", C, OK | {"model": "../../etc"}, 404, "model_not_found", "model"),
    ("echo", C, OK | {"echo": True}, 400, None, "echo"),
    ("best_of", C, OK | {"best_of": 2}, 400, None, "best_of"),
    ("suffix", C, OK | {"suffix": "x"}, 400, None, "suffix"),
    ("tools", CHAT, OK_CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     None, "tools"),
    ("json_schema", CHAT, OK_CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {}}}}, 400, None, "response_format"),
    ("json_object", CHAT, OK_CHAT | {"response_format": {"type": "json_object"}}, 400, None,
     "response_format"),
    ("logit_bias", C, OK | {"logit_bias": {"5": 10}}, 400, None, "logit_bias"),
    ("completion-logprobs-6", C, OK | {"logprobs": 6}, 400, "invalid_value", "logprobs"),
    ("top_logprobs-alone", CHAT, OK_CHAT | {"top_logprobs": 2}, 400, None, "top_logprobs"),
    ("stream_options-alone", C, OK | {"stream_options": {"include_usage": True}}, 400, None,
     "stream_options"),
    ("batch", C, OK | {"prompt": ["one", "two"]}, 400, None, "prompt"),
    ("token-batch", C, OK | {"prompt": [[1, 2], [3]]}, 400, None, "prompt"),
    ("mixed-prompt", C, OK | {"prompt": ["one", 2]}, 400, None, "prompt"),
    ("token-out-of-vocab", C, OK | {"prompt": [1, 2, 100000]}, 400, None, "prompt"),
    ("token-negative", C, OK | {"prompt": [-1]}, 400, None, "prompt"),
    ("body-is-a-list", C, [OK], 400, "invalid_value", ...),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD],
)
def test_bad_requests_get_a_4xx_in_openai_shape(gw, path, body, status, code, param):
    with http(gw) as h:
        for stream in (False, True):  # a streamed request is refused before its stream starts
            payload = body | {"stream": True} if stream and isinstance(body, dict) else body
            if stream and "stream_options" in body:
                continue
            r = h.post(path, json=payload)
            error = assert_openai_error(r, status, code, param)
            assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
            assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("content", "status"),
    [(b"{not json", 400), (b"\xff\xfe", 400), (b"", 400), (b"null", 400), (b"[]", 400)],
    ids=["invalid-json", "not-utf8", "empty", "null", "empty-list"],
)
def test_a_body_that_is_not_a_request_is_a_400(gw, content, status):
    with http(gw) as h:
        r = h.post(C, content=content, headers={"content-type": "application/json"})
    error = assert_openai_error(r, status)
    assert error["type"] == "invalid_request_error"
    if not content:
        assert "no body" in error["message"]


def test_a_body_over_the_limit_is_a_413(gw):
    with http(gw) as h:
        r = h.post(C, json=OK | {"prompt": "x" * (MAX_BODY + 10)})
        error = assert_openai_error(r, 413, "body_too_large")
        assert str(MAX_BODY) in error["message"]
        # a body just under the limit goes on to be judged on its prompt
        r = h.post(C, json=OK | {"prompt": "x" * (MAX_BODY - 200)})
        assert_openai_error(r, 400, param="prompt")


def test_wrong_method_and_unknown_path(gw):
    with http(gw) as h:
        assert_openai_error(h.get(C), 405, "method_not_allowed")
        assert_openai_error(h.get("/v1/nope"), 404, "not_found")
        assert_openai_error(h.post("/v1/models", json={}), 405)


def test_the_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
    assert e.value.param == "temperature"


# ── API keys ──


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_registry):
    """A gateway with keys (so not open access): (gateway, {kind: plaintext key})."""
    tmp = tmp_path_factory.mktemp("gw-keys")
    config = base_config(tmp, tiny_registry)
    keys = {
        "inference": make_key(config.database, "acme", ["inference", "models:read"])[1],
        "reader": make_key(config.database, "acme", ["models:read"])[1],
        "rpm2": make_key(config.database, "acme", ["inference"], rpm=2)[1],
        "tpm": make_key(config.database, "acme", ["inference"], tpm=100)[1],
        "viewer": make_key(config.database, "acme", ["inference"], role="viewer")[1],
    }
    revoked, keys["revoked"] = make_key(config.database, "acme", ["inference"])
    with running(config) as g:
        g.state.authenticator.revoke(CLI, revoked.project_id, revoked.key_id)
        assert not g.state.open_access
        yield g, keys


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_without_a_valid_key_are_401(keyed):
    gw, keys = keyed
    bad = keys["inference"][:-2] + "xx"
    with http(gw) as h:
        for headers in ({}, bearer(bad), bearer("sk-nothing"), bearer(keys["revoked"]),
                        {"Authorization": keys["inference"]}):  # fmt: skip
            r = h.post(C, json=OK | {"max_tokens": 2}, headers=headers)
            assert_openai_error(r, 401, "invalid_api_key")
            assert keys["inference"] not in r.text
        assert_openai_error(h.get("/v1/models"), 401, "invalid_api_key")
        assert_openai_error(h.post("/v1/tokenize", json=OK), 401, "invalid_api_key")
        # liveness, readiness and metrics are for probes and scrapers: no key
        for path in ("/healthz", "/readyz", "/metrics"):
            assert h.get(path).status_code == 200


def test_scopes_decide_what_a_key_may_do(keyed):
    gw, keys = keyed
    with http(gw, **bearer(keys["reader"])) as h:
        assert_openai_error(h.post(C, json=OK | {"max_tokens": 2}), 403, "missing_scope")
        assert_openai_error(h.post(CHAT, json=OK_CHAT | {"max_tokens": 2}), 403, "missing_scope")
        r = h.get("/v1/models")
        assert r.status_code == 200 and "tiny" in {m["id"] for m in r.json()["data"]}
    client = openai_client(gw, keys["inference"])
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).choices[0].text
    assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai_client(gw, keys["revoked"]).models.list()


def test_a_key_whose_role_lacks_an_action_its_scope_names_is_403(keyed):
    gw, keys = keyed
    with http(gw, **bearer(keys["viewer"])) as h:
        error = assert_openai_error(h.post(C, json=OK | {"max_tokens": 2}), 403, "forbidden")
    assert "role viewer" in error["message"]


def test_a_revoked_key_stops_working_at_once(keyed):
    gw, _ = keyed
    record, key = make_key(gw.config.database, "acme", ["inference"])
    with http(gw, **bearer(key)) as h:
        assert h.post(C, json=OK | {"max_tokens": 2}).status_code == 200
        gw.state.authenticator.revoke(CLI, record.project_id, record.key_id)
        error = assert_openai_error(h.post(C, json=OK | {"max_tokens": 2}), 401, "invalid_api_key")
    assert f"API key {record.key_id} was revoked at" in error["message"]


# ── rate limits ──


def check_rpm_limit(gw, key: str) -> None:
    with http(gw, **bearer(key)) as h:
        first, second, third = (h.post(C, json=OK | {"max_tokens": 2}) for _ in range(3))
    assert first.status_code == second.status_code == 200, second.text
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert_openai_error(third, 429, "rate_limit_exceeded")
    assert third.json()["error"]["type"] == "rate_limit_error"
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["x-ratelimit-limit-requests"] == "2"
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.headers["x-ratelimit-reset-requests"].endswith("s")


def test_requests_per_minute(keyed):
    gw, keys = keyed
    check_rpm_limit(gw, keys["rpm2"])
    with pytest.raises(openai.RateLimitError):  # the client sees the same
        openai_client(gw, keys["rpm2"]).completions.create(model=MODEL, prompt=PROMPT)


def test_tokens_per_minute(keyed):
    gw, keys = keyed
    with http(gw, **bearer(keys["tpm"])) as h:
        # prompt (9) + max_tokens can never fit 100 tokens a minute: 400, not "retry later"
        never = h.post(C, json=OK | {"max_tokens": 95})
        assert_openai_error(never, 400, "tokens_exceed_limit", "max_tokens")
        assert "retry-after" not in never.headers
        first = h.post(C, json=OK | {"max_tokens": 20})
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        # fits the limit alone, not what is left of it (give the bucket's refill some slack)
        r = h.post(C, json=OK | {"max_tokens": 100 - used - 9 + 5})
    assert_openai_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 100 - used + 2
    assert "tokens per minute" in r.json()["error"]["message"]


def test_default_limits_apply_to_open_access_too(tmp_path, tiny_registry):
    config = base_config(tmp_path, tiny_registry, limits=Limits(requests_per_minute=1))
    with running(config) as gw, http(gw) as h:
        assert h.post(C, json=OK | {"max_tokens": 2}).status_code == 200
        assert_openai_error(h.post(C, json=OK | {"max_tokens": 2}), 429, "rate_limit_exceeded")


REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_reachable() -> bool:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not redis_reachable(), reason=f"no Redis answers at {REDIS_URL}")
def test_rate_limits_in_redis(tmp_path, tiny_registry):
    config = base_config(tmp_path, tiny_registry, redis_url=REDIS_URL)
    _, key = make_key(config.database, "acme", ["inference"], rpm=2)  # fresh id: fresh buckets
    with running(config) as gw:
        check_rpm_limit(gw, key)


# ── the engine's limits ──


def test_a_full_engine_queue_is_a_503_with_retry_after(tmp_path, tiny_registry, monkeypatch):
    slow_steps(monkeypatch, 0.005)
    config = base_config(tmp_path, tiny_registry)
    engine = EngineConfig(n_slots=1, max_waiting=1, threads=1, target="onnx-fp32")
    config = replace(config, models=replace(config.models, engine=engine))
    with running(config) as gw:
        results: list[httpx.Response] = []

        def call() -> None:
            with http(gw) as h:
                results.append(h.post(C, json=OK | {"max_tokens": 60}))

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        statuses = sorted(r.status_code for r in results)
        assert len(statuses) == 5 and set(statuses) == {200, 503}, statuses
        for r in results:
            if r.status_code == 503:
                assert_openai_error(r, 503, "overloaded")
                assert int(r.headers["retry-after"]) >= 1
        # the queue drains: the gateway serves again
        with http(gw) as h:
            assert h.post(C, json=OK | {"max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    ("path", "stream"), [(C, True), (CHAT, True), (C, False)], ids=["sse", "chat-sse", "whole"]
)
def test_a_client_that_hangs_up_frees_its_slot(tmp_path, tiny_registry, monkeypatch, path, stream):
    slow_steps(monkeypatch, 0.01)  # 100 tokens take over a second
    config = base_config(tmp_path, tiny_registry)
    engine = EngineConfig(n_slots=1, max_waiting=4, threads=1, target="onnx-fp32")
    config = replace(config, models=replace(config.models, engine=engine))
    body = (OK if path == C else OK_CHAT) | {"max_tokens": 100, "temperature": 0, "stream": stream}
    with running(config) as gw:
        with http(gw) as h:
            assert h.post(C, json=OK | {"max_tokens": 1}).status_code == 200  # loads the model
        before = engine_stats(gw)
        if stream:  # read three events, then close the connection
            with http(gw) as h, h.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                events = 0
                for line in r.iter_lines():
                    events += line.startswith("data: ")
                    if events == 3:
                        break
        else:  # give up waiting for the whole answer
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{gw.url}{path}", json=body, timeout=0.3)

        # the slot must be free long before 100 steps could run
        def idle():
            stats = engine_stats(gw)
            return stats if stats.slots_used == stats.queue_depth == 0 else None

        stats = wait_for(idle, timeout=5)
        generated = stats.generated_tokens_total - before.generated_tokens_total
        assert generated < 60, f"{generated} tokens generated after the client left"
        # the one slot serves the next request at once
        with http(gw) as h:
            t = time.monotonic()
            r = h.post(C, json=OK | {"max_tokens": 3})
            assert r.status_code == 200 and time.monotonic() - t < 1.0
            text = h.get("/metrics").text
        assert metric(text, "aimass_running_requests", model=MODEL) == 0
        assert deployment(gw).in_flight == 0
        if not stream:  # logged and counted as nginx does: 499, client closed request
            assert metric(text, "aimass_requests_total", status="499", endpoint=path) == 1


@pytest.mark.parametrize(
    "redis_url",
    [
        None,
        pytest.param(
            REDIS_URL,
            marks=pytest.mark.skipif(not redis_reachable(), reason=f"no Redis at {REDIS_URL}"),
        ),
    ],
    ids=["memory", "redis"],
)
def test_a_client_that_hangs_up_is_charged_what_it_used(
    tmp_path, tiny_registry, monkeypatch, redis_url
):
    """A stream whose client hangs up is charged what it used, prompt and the tokens sent:
    not the whole reservation (prompt + max_tokens), not the prompt only. With Redis the
    settlement is a round trip that the hang-up's cancellation must not cut."""
    slow_steps(monkeypatch, 0.01)
    config = base_config(tmp_path, tiny_registry, redis_url=redis_url)
    _, key = make_key(config.database, "acme", ["inference"], tpm=200)
    body = OK | {"max_tokens": 100, "stream": True}  # reserves 109 of the 200
    with running(config) as gw, http(gw, **bearer(key)) as h:
        with h.stream("POST", C, json=body) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 20:  # 20 tokens
                    break

        def idle():
            stats = engine_stats(gw)
            return stats.slots_used == stats.queue_depth == 0

        wait_for(idle, timeout=5)
        time.sleep(0.1)  # the stream's clean-up runs after its slot is free
        r = h.post(C, json=OK | {"max_tokens": 100})  # fits only if most of the 109 came back
        assert r.status_code == 200, r.text
    # 200 - (9 + at least 20 used) - 109 reserved now, plus the refill: 3.3 tokens a second
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    assert 200 - 109 - 9 - 100 < remaining <= 200 - 109 - 9 - 20 + 5
