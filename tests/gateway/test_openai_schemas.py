"""OpenAI schemas and validation: what real clients send decodes, bounds fail naming the field,
responses encode exactly as OpenAI's and parse in the official client."""

from __future__ import annotations

import json

import httpx
import msgspec
import openai
import pytest

from engine.request import SamplingParams
from gateway.openai import schemas as s
from gateway.openai.validation import (
    InvalidParameter,
    check_request,
    include_usage,
    param_from_validation_error,
    prompt_inputs,
    requested_max_tokens,
    resolve_max_tokens,
    stop_strings,
    template_messages,
    to_sampling,
    tokenize_input,
)

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields) -> s.ChatCompletionRequest:
    body = {"model": "m", "messages": MSGS} | fields
    return msgspec.json.decode(json.dumps(body), type=s.ChatCompletionRequest)


def completion(**fields) -> s.CompletionRequest:
    body = {"model": "m", "prompt": "hi"} | fields
    return msgspec.json.decode(json.dumps(body), type=s.CompletionRequest)


class FakeServer:
    """An httpx transport for the official client: records each request body and answers with
    a prepared body, so a test sees the exact bytes the client sends and receives."""

    def __init__(self, reply: bytes = b"{}", content_type: str = "application/json"):
        self.reply, self.content_type, self.bodies = reply, content_type, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.content)
        return httpx.Response(200, content=self.reply, headers={"content-type": self.content_type})

    def client(self) -> openai.OpenAI:
        http = httpx.Client(transport=httpx.MockTransport(self))
        return openai.OpenAI(api_key="sk-test", base_url="http://gw/v1", http_client=http)


def sse(*events: msgspec.Struct) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


# --- what clients send ----------------------------------------------------------------------


def test_official_client_chat_stream_payload_decodes():
    server = FakeServer(sse(), "text/event-stream")
    stream = server.client().chat.completions.create(
        model="m",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0.2,
        top_p=0.9,
        max_completion_tokens=16,
        stop=["\n\n"],
        seed=7,
        logprobs=True,
        top_logprobs=3,
        n=2,
        user="u-1",
        # sent by some apps and frameworks, meaningless here: accepted and ignored
        parallel_tool_calls=False,
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    list(stream)
    req = msgspec.json.decode(server.bodies[0], type=s.ChatCompletionRequest)
    assert req.stream and include_usage(req)
    assert requested_max_tokens(req) == 16 and stop_strings(req) == ("\n\n",)
    assert to_sampling(req, {}) == SamplingParams(
        temperature=0.2,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        seed=7,
        n=2,
        logprobs=3,
    )
    assert template_messages(req.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_official_client_completion_payload_decodes():
    server = FakeServer(msgspec.json.encode(s.Completion(model="m", choices=[])))
    server.client().completions.create(
        model="m", prompt="Once", max_tokens=8, logprobs=2, stop="END", echo=False, best_of=1
    )
    req = msgspec.json.decode(server.bodies[0], type=s.CompletionRequest)
    assert prompt_inputs(req) == ["Once"] and stop_strings(req) == ("END",)
    assert to_sampling(req, {}) == SamplingParams(logprobs=2)


def test_langchain_style_payload_with_nulls_and_neutral_values():
    # LangChain's legacy OpenAI LLM sends every default, nulls included
    req = completion(
        temperature=0.7,
        top_p=1,
        frequency_penalty=0,
        presence_penalty=0,
        n=1,
        logit_bias={},
        seed=None,
        logprobs=None,
        max_tokens=256,
        best_of=1,
        stream=False,
        stop=None,
    )
    assert to_sampling(req, {}) == SamplingParams(temperature=0.7)
    req = chat(stream=None, n=None, temperature=None, tool_choice="none", response_format=None)
    assert to_sampling(req, {"temperature": 0.5}) == SamplingParams(temperature=0.5)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a", ["a"]),
        (["a"], ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert prompt_inputs(completion(prompt=prompt)) == expected


@pytest.mark.parametrize("prompt", [[], ["a", 1], [[1], "a"], [[]]])
def test_malformed_prompt_lists_are_refused(prompt):
    with pytest.raises(InvalidParameter) as e:
        check_request(completion(prompt=prompt))
    assert e.value.param == "prompt"


# --- bounds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("n", 0),
        ("n", s.MAX_N + 1),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -3),
        ("max_tokens", 0),
        ("max_completion_tokens", 0),
        ("top_logprobs", 21),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("seed", 2**63),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("messages", []),
        ("temprature", 1.0),  # a typo: unknown fields are refused, not ignored
    ],
)
def test_chat_bounds_name_the_field(field, value):
    with pytest.raises(msgspec.ValidationError) as e:
        chat(**{field: value})
    assert field in str(e.value)
    assert param_from_validation_error(e.value) == field


@pytest.mark.parametrize("field, value", [("logprobs", 6), ("logprobs", -1), ("best_of", 9)])
def test_completion_bounds_name_the_field(field, value):
    with pytest.raises(msgspec.ValidationError) as e:
        completion(**{field: value})
    assert param_from_validation_error(e.value) == field


def test_nested_errors_name_the_path():
    with pytest.raises(msgspec.ValidationError) as e:
        chat(messages=[{"role": "bot", "content": "x"}])
    assert param_from_validation_error(e.value) == "messages[0].role"
    with pytest.raises(msgspec.ValidationError) as e:
        chat(stream=True, stream_options={"include_usage": True, "bogus": 1})
    assert param_from_validation_error(e.value) == "stream_options.bogus"
    with pytest.raises(msgspec.ValidationError) as e:
        msgspec.json.decode(json.dumps({"messages": MSGS}), type=s.ChatCompletionRequest)
    assert param_from_validation_error(e.value) == "model"


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, param, words",
    [
        (lambda: completion(echo=True), "echo", "echo=True"),
        (lambda: completion(best_of=3, n=2), "best_of", "n (2)"),
        (lambda: completion(suffix="x"), "suffix", "suffix"),
        (lambda: completion(logit_bias={"50256": -100}), "logit_bias", "bias"),
        (lambda: completion(stream_options={"include_usage": True}), "stream_options", "stream"),
        (
            lambda: chat(response_format={"type": "json_schema", "json_schema": {}}),
            "response_format",
            "json_schema",
        ),
        (lambda: chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "tool"),
        (lambda: chat(tool_choice="required"), "tool_choice", "required"),
        (lambda: chat(modalities=["text", "audio"]), "modalities", "audio"),
        (lambda: chat(top_logprobs=2), "top_logprobs", "logprobs=true"),
        (lambda: chat(moderation={"model": "omni-moderation-latest"}), "moderation", "served"),
        (
            lambda: chat(messages=[{"role": "tool", "content": "42", "tool_call_id": "c"}]),
            "messages[0]",
            "tool",
        ),
        (
            lambda: chat(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            ),
            "messages[0].content[0]",
            "image_url",
        ),
        (
            lambda: chat(messages=[{"role": "user", "content": None}]),
            "messages[0].content",
            "required",
        ),
    ],
)
def test_unsupported_features_are_refused_clearly(make, param, words):
    with pytest.raises(InvalidParameter) as e:
        to_sampling(make(), {})
    assert e.value.param == param
    assert words in e.value.message


def test_sampling_precedence_request_then_package_then_engine():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_tokens": 99}
    assert to_sampling(chat(), defaults) == SamplingParams(temperature=0.6, top_p=0.9, top_k=50)
    got = to_sampling(chat(temperature=0, top_k=-1, presence_penalty=0.5), defaults)
    assert (got.temperature, got.top_k, got.top_p, got.presence_penalty) == (0, 0, 0.9, 0.5)
    assert to_sampling(chat(logprobs=True), {}).logprobs == 0
    assert to_sampling(chat(logprobs=False, top_logprobs=0), {}).logprobs is None
    assert to_sampling(completion(logprobs=0), {}).logprobs == 0


def test_stop_strings_and_max_tokens():
    assert stop_strings(chat()) == () and stop_strings(chat(stop=["a", "", "b"])) == ("a", "b")
    assert requested_max_tokens(chat(max_tokens=5, max_completion_tokens=7)) == 7
    assert requested_max_tokens(completion(max_tokens=5)) == 5
    assert not include_usage(chat(stream=True))


def test_resolve_max_tokens():
    assert resolve_max_tokens(None, 10, 100, 256) == 90  # default cut to the room left
    assert resolve_max_tokens(None, 10, 100, 20) == 20
    assert resolve_max_tokens(90, 10, 100, 20) == 90
    with pytest.raises(InvalidParameter) as e:
        resolve_max_tokens(91, 10, 100, 20)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert e.value.message.startswith(
        "This model's maximum context length is 100 tokens. However, you requested 101 tokens "
        "(10 in the messages, 91 in the completion)."
    )
    with pytest.raises(InvalidParameter) as e:
        resolve_max_tokens(None, 100, 100, 20, prompt_name="prompt")
    assert "your prompt resulted in 100 tokens" in e.value.message and e.value.param == "prompt"


def test_tokenize_request_takes_prompt_or_messages():
    dec = msgspec.json.Decoder(s.TokenizeRequest)
    assert tokenize_input(dec.decode(b'{"model": "m", "prompt": "hi"}')) == "hi"
    msgs = tokenize_input(dec.decode(json.dumps({"messages": MSGS}).encode()))
    assert msgs == [{"role": "user", "content": "hi"}]
    for body in (b"{}", json.dumps({"prompt": "a", "messages": MSGS}).encode()):
        with pytest.raises(InvalidParameter):
            tokenize_input(dec.decode(body))


# --- responses ------------------------------------------------------------------------------


def as_json(obj: msgspec.Struct) -> dict:
    return json.loads(msgspec.json.encode(obj))


def test_chat_completion_encodes_like_openai():
    resp = s.ChatCompletion(
        id="chatcmpl-1",
        created=1700000000,
        model="m",
        choices=[s.ChatChoice(0, s.ChatMessage(content="Hello"), finish_reason="stop")],
        usage=s.Usage(3, 1, 4),
    )
    assert as_json(resp) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "system_fingerprint": None,
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    fresh = s.ChatCompletion(model="m", choices=[])
    assert fresh.id.startswith("chatcmpl-") and isinstance(fresh.created, int)
    assert s.Completion(model="m", choices=[]).id.startswith("cmpl-")


def test_chat_chunks_keep_nulls_and_omit_unset_usage():
    first = s.ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[s.ChatChunkChoice(0, s.ChatDelta(role="assistant", content=""))],
    )
    assert as_json(first) == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "system_fingerprint": None,
    }
    last = s.ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[s.ChatChunkChoice(0, s.ChatDelta(), finish_reason="length")],
        usage=None,
    )
    assert as_json(last)["choices"][0]["delta"] == {} and as_json(last)["usage"] is None
    usage = s.ChatCompletionChunk(id="c", created=1, model="m", choices=[], usage=s.Usage(1, 2, 3))
    assert as_json(usage)["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
    }


def test_logprob_shapes():
    lp = s.ChatLogprobs(
        content=[s.TokenLogprob("Hi", -0.1, [72, 105], [s.TopLogprob("Hi", -0.1, [72, 105])])]
    )
    assert as_json(lp) == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
            }
        ],
        "refusal": None,
    }
    clp = s.CompletionLogprobs(["a", "b"], [-0.5, -1.0], [{"a": -0.5}, {"b": -1.0}], [0, 1])
    chunk = s.CompletionChunk(
        id="cmpl-1", created=1, model="m", choices=[s.CompletionChoice(0, "ab", clp)]
    )
    assert as_json(chunk)["choices"][0] == {
        "index": 0,
        "text": "ab",
        "logprobs": {
            "tokens": ["a", "b"],
            "token_logprobs": [-0.5, -1.0],
            "top_logprobs": [{"a": -0.5}, {"b": -1.0}],
            "text_offset": [0, 1],
        },
        "finish_reason": None,
    }
    assert as_json(chunk)["object"] == "text_completion" and "usage" not in as_json(chunk)


def test_models_tokenize_and_errors_encode():
    models = s.ModelList(
        [s.Model(id="tiny@production", created=5), s.Model(id="b", max_model_len=64)]
    )
    assert as_json(models) == {
        "data": [
            {"id": "tiny@production", "object": "model", "created": 5, "owned_by": "aimass"},
            {"id": "b", "object": "model", "created": 0, "owned_by": "aimass", "max_model_len": 64},
        ],
        "object": "list",
    }
    assert as_json(s.TokenizeResponse(count=2, max_model_len=64, tokens=[1, 2])) == {
        "count": 2,
        "max_model_len": 64,
        "tokens": [1, 2],
    }
    err = s.ErrorResponse(s.ErrorBody("temperature=3 is more than 2", "invalid_request_error"))
    assert as_json(err) == {
        "error": {
            "message": "temperature=3 is more than 2",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_official_client_parses_our_responses():
    resp = s.ChatCompletion(
        model="m",
        choices=[s.ChatChoice(0, s.ChatMessage(content="Hello"), finish_reason="stop")],
        usage=s.Usage(3, 1, 4),
    )
    got = (
        FakeServer(msgspec.json.encode(resp))
        .client()
        .chat.completions.create(model="m", messages=MSGS)
    )
    assert got.choices[0].message.content == "Hello" and got.usage.total_tokens == 4

    chunk = dict(id="chatcmpl-1", created=1, model="m")
    events = sse(
        s.ChatCompletionChunk(
            **chunk, choices=[s.ChatChunkChoice(0, s.ChatDelta("assistant", ""))], usage=None
        ),
        s.ChatCompletionChunk(
            **chunk, choices=[s.ChatChunkChoice(0, s.ChatDelta(content="Hi"))], usage=None
        ),
        s.ChatCompletionChunk(
            **chunk, choices=[s.ChatChunkChoice(0, s.ChatDelta(), None, "stop")], usage=None
        ),
        s.ChatCompletionChunk(**chunk, choices=[], usage=s.Usage(3, 1, 4)),
    )
    stream = (
        FakeServer(events, "text/event-stream")
        .client()
        .chat.completions.create(
            model="m", messages=MSGS, stream=True, stream_options={"include_usage": True}
        )
    )
    got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hi"
    assert got[2].choices[0].finish_reason == "stop" and got[-1].usage.completion_tokens == 1

    comp = s.Completion(model="m", choices=[s.CompletionChoice(0, "yes", None, "length")])
    got = FakeServer(msgspec.json.encode(comp)).client().completions.create(model="m", prompt="x")
    assert got.choices[0].text == "yes" and got.choices[0].finish_reason == "length"
