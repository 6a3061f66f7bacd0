"""End to end: the real gateway under uvicorn, fake OpenAI-format upstreams, the openai SDK and httpx as clients."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from conftest import FakeUpstream, Reply, chunks, completion, simple_config

USER = [{"role": "user", "content": "hi"}]


def sse_events(text: str) -> list[Any]:
    """The data payloads of an SSE body, JSON-decoded except [DONE]."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- Chat completions through the openai SDK ---


def test_sync_client_gets_non_stream_answer_with_requested_model_name(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, models=[{"up-model-x": "gpt-4o"}]))
    answer = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.choices[0].message.content == "echo: hi"
    assert answer.model == "gpt-4o"
    assert upstream.received[-1].json["model"] == "up-model-x"
    assert upstream.received[-1].headers["Authorization"] == "Bearer sk-up0-secret"


def test_sync_client_streams_and_gets_done(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    received = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "echo: hi"
    assert received[-1].choices[0].finish_reason == "stop"
    assert all(c.model == "gpt-4o" for c in received)


@pytest.mark.anyio
async def test_async_client_streams_with_usage(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    upstream.enqueue(sse=chunks(["a", "b"], usage=True))
    async with gw.async_client("sk-client") as client:  # closed on this loop, not by a later test's GC
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True})
        received = [c async for c in stream]
    assert received[-1].usage is not None and received[-1].usage.total_tokens == 7
    assert upstream.received[-1].json["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
async def test_async_client_non_stream(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    async with gw.async_client("sk-client") as client:
        answer = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.choices[0].message.content == "echo: hi"


def test_body_is_forwarded_faithfully_with_unknown_fields(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    body = {"model": "gpt-4o", "messages": USER, "temperature": 0.2, "logit_bias": {"50256": -100},
            "some_future_field": {"nested": [1, 2, {"x": None}]}, "tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "additionalProperties": False}}}]}
    with gw.http("sk-client") as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert upstream.received[-1].json == {**body, "model": "gpt-4o"}


def test_tools_false_strips_tools(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    config["providers"][0]["tools"] = False
    gw = make_gateway(config)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, tools=tools, tool_choice="auto")
    sent = upstream.received[-1].json
    assert "tools" not in sent and "tool_choice" not in sent


def test_provider_headers_and_body_overrides_are_applied(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream, models=["gpt-4o", "gpt-4o-mini"])
    config["providers"][0]["preferences"].update({
        "headers": {"X-Custom": "yes"},
        "post_body_parameter_overrides": {"all": {"user": "gw"}, "gpt-4o": {"temperature": 0.5}}})
    gw = make_gateway(config)
    client = gw.client("sk-client")
    client.chat.completions.create(model="gpt-4o", messages=USER, temperature=1.0)
    assert upstream.received[-1].headers["X-Custom"] == "yes"
    assert upstream.received[-1].json["temperature"] == 0.5 and upstream.received[-1].json["user"] == "gw"
    client.chat.completions.create(model="gpt-4o-mini", messages=USER, temperature=1.0)
    assert upstream.received[-1].json["temperature"] == 1.0 and upstream.received[-1].json["user"] == "gw"


def test_stream_response_has_sse_headers(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"


# --- Auth and the statuses of CONTRACT.md ---


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code", "param"} <= set(body["error"])
    return body["error"]  # type: ignore[no-any-return]


def test_missing_key_is_401(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    with gw.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        gw.client("sk-wrong").chat.completions.create(model="gpt-4o", messages=USER)


def test_x_api_key_header_authenticates(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    response = httpx.get(gw.url + "/v1/models", headers={"x-api-key": "sk-client"})
    assert response.status_code == 200 and response.json()["data"][0]["id"] == "gpt-4o"


def test_key_that_may_not_use_a_model_gets_403(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream, models=["gpt-4o", "o1"])
    config["api_keys"][0]["model"] = ["gpt-4o"]
    gw = make_gateway(config)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        gw.client("sk-client").chat.completions.create(model="o1", messages=USER)
    assert caught.value.status_code == 403


def test_unknown_model_gets_404(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    with pytest.raises(openai.NotFoundError) as caught:
        gw.client("sk-client").chat.completions.create(model="nope", messages=USER)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"model": "gpt-4o"}', "'messages' is required"),
    (b'{"model": 5, "messages": []}', "'model' is required"),
    (b'{"model": "gpt-4o", "messages": ["hi"]}', "messages[0]"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "'stream'"),
    (b"\xff\xfe\x00", "not valid JSON"),
])
def test_malformed_bodies_get_400(upstream: FakeUpstream, make_gateway, body: bytes, message: str) -> None:
    gw = make_gateway(simple_config(upstream))
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and message in error_of(response)["message"]
    assert not upstream.received


def test_oversized_body_gets_413(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    config["preferences"] = {"max_body_size": "1KiB"}
    gw = make_gateway(config)
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]}
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json=big)
        assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

        def chunked() -> Any:
            yield json.dumps(big).encode()

        response = http.post("/v1/chat/completions", content=chunked())
        assert response.status_code == 413


def test_rate_limited_key_gets_429_with_retry_after(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, rate_limit="2/min"))
    client = gw.client("sk-client")
    client.chat.completions.create(model="gpt-4o", messages=USER)
    client.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 60
    assert len(upstream.received) == 2


def test_unknown_route_and_wrong_method_use_the_envelope(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    with gw.http("sk-client") as http:
        assert http.get("/v1/nope").status_code == 404 and error_of(http.get("/v1/nope"))
        response = http.get("/v1/chat/completions")
        assert response.status_code == 405 and error_of(response)


def test_healthz_needs_no_key(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))
    assert httpx.get(gw.url + "/healthz").status_code == 200


# --- Failover and passthrough ---


@pytest.mark.parametrize("status", [401, 403, 404, 429, 500, 503])
def test_retryable_upstream_status_moves_to_next_channel(make_upstream, make_gateway, status: int) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(status=status, json={"error": {"message": f"failure {status}"}})
    gw = make_gateway(simple_config(first, second))
    answer = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.choices[0].message.content == "echo: hi"
    assert len(first.received) == 1 and len(second.received) == 1


@pytest.mark.parametrize("status", [400, 413, 422])
def test_client_error_from_upstream_is_passed_through(make_upstream, make_gateway, status: int) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(status=status, json={"error": {"message": "max_tokens is too large", "type": "x"}})
    gw = make_gateway(simple_config(first, second))
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert response.status_code == status
    assert error_of(response)["message"] == "max_tokens is too large"
    assert not second.received


def test_all_channels_failing_lists_every_attempt(make_upstream, make_gateway) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(status=500, json={"error": {"message": "boom one"}})
    second.enqueue(status=502, body=b"<html>bad gateway</html>", content_type="text/html")
    gw = make_gateway(simple_config(first, second))
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert response.status_code == 502
    message = error_of(response)["message"]
    assert "up0/gpt-4o: 500 boom one" in message and "up1/gpt-4o: 502 <html>bad gateway</html>" in message


def test_connection_refused_moves_on(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    dead = dict(config["providers"][0], provider="dead", base_url="http://127.0.0.1:9/v1/chat/completions")
    config["providers"].insert(0, dead)
    gw = make_gateway(config)
    answer = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.choices[0].message.content == "echo: hi"


def test_stalled_upstream_times_out_to_504(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    config["providers"][0]["preferences"]["model_timeout"] = 0.3
    upstream.enqueue(delay=5, json=completion("late"))
    gw = make_gateway(config)
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert response.status_code == 504 and "timed out" in error_of(response)["message"]


def test_auto_retry_false_makes_one_attempt(make_upstream, make_gateway) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(status=500, json={"error": {"message": "boom"}})
    gw = make_gateway(simple_config(first, second, AUTO_RETRY=False))
    with gw.http("sk-client") as http:
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}).status_code == 502
    assert not second.received


def test_provider_keys_never_appear_in_errors(upstream: FakeUpstream, make_gateway) -> None:
    upstream.enqueue(status=401, json={"error": {"message": "Incorrect API key provided: sk-up0-secret"}})
    gw = make_gateway(simple_config(upstream))
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
    assert response.status_code == 502 and "sk-up0-secret" not in response.text


# --- Streaming: commit late, fail cleanly ---


def test_stream_failing_before_first_chunk_fails_over(make_upstream, make_gateway) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(sse=chunks(["never"]), reset_after=0)
    gw = make_gateway(simple_config(first, second))
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: hi"


def test_stream_error_event_before_first_chunk_fails_over(make_upstream, make_gateway) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(sse=[{"error": {"message": "overloaded", "type": "server_error"}}])
    gw = make_gateway(simple_config(first, second))
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: hi"


@pytest.mark.parametrize("reply", [
    Reply(sse=chunks(["a", "b", "c"]), reset_after=2),
    Reply(raw_chunks=[b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":'
                      b'[{"index":0,"delta":{"role":"assistant","content":"a"},"finish_reason":null}]}\n\n',
                      b"data: {broken json\n\n"]),
    Reply(sse=chunks(["a"])[:2]),  # ends without finish_reason and without [DONE]
])
def test_stream_failing_mid_way_ends_with_error_chunk_and_done(upstream: FakeUpstream, make_gateway,
                                                               reply: Reply) -> None:
    upstream.enqueue(reply)
    gw = make_gateway(simple_config(upstream))
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER, "stream": True})
    events = sse_events(response.text)
    assert response.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "stream_interrupted"


def test_stream_stalling_between_chunks_ends_with_error(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    config["providers"][0]["preferences"]["model_timeout"] = 0.3
    upstream.enqueue(sse=chunks(["a", "b"]), stall_after=2)
    gw = make_gateway(config)
    with gw.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER, "stream": True})
    events = sse_events(response.text)
    assert "timed out" in events[-2]["error"]["message"] and events[-1] == "[DONE]"


def test_sse_split_across_reads_with_crlf_and_comments_is_reframed(upstream: FakeUpstream, make_gateway) -> None:
    events = [json.dumps(e).encode() for e in chunks(["he", "llo"])[:-1]]
    raw = b": keep-alive\r\n\r\n" + b"".join(b"data: " + e + b"\r\n\r\n" for e in events) + b"data: [DONE]\r\n\r\n"
    upstream.enqueue(raw_chunks=[raw[i:i + 7] for i in range(0, len(raw), 7)])
    gw = make_gateway(simple_config(upstream))
    stream = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello"


def test_error_trigger_in_answer_fails_over(make_upstream, make_gateway) -> None:
    first, second = make_upstream(), make_upstream()
    first.enqueue(json=completion("The bot's usage is covered by the developer"))
    config = simple_config(first, second)
    config["preferences"] = {"error_triggers": ["usage is covered by the developer"]}
    gw = make_gateway(config)
    assert gw.client("sk-client").chat.completions.create(
        model="gpt-4o", messages=USER).choices[0].message.content == "echo: hi"


# --- Client disconnects free the upstream ---


def test_client_disconnect_mid_stream_closes_upstream(upstream: FakeUpstream, make_gateway) -> None:
    upstream.enqueue(sse=chunks(["a"] * 50), chunk_delay=0.1)
    gw = make_gateway(simple_config(upstream))
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-client"},
            json={"model": "gpt-4o", "messages": USER, "stream": True}) as response:
        next(response.iter_bytes())
    assert upstream.wait_cancelled(1, timeout=3)


def test_client_disconnect_while_waiting_cancels_upstream(upstream: FakeUpstream, make_gateway) -> None:
    upstream.enqueue(delay=10, json=completion("late"))
    gw = make_gateway(simple_config(upstream))

    def leave_early() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-client"},
                       json={"model": "gpt-4o", "messages": USER}, timeout=0.5)

    thread = threading.Thread(target=leave_early)
    thread.start()
    thread.join()
    assert upstream.wait_cancelled(1, timeout=3)


# --- /v1/models and the api_keys rules ---


def models_of(gw: Any, key: str) -> list[str]:
    return [m.id for m in gw.client(key).models.list()]


def test_models_follow_every_rule_syntax(make_upstream, make_gateway) -> None:
    a, b = make_upstream(), make_upstream()
    config = {
        "providers": [
            {"provider": "pa", "base_url": f"{a.url}/v1/chat/completions", "api": "sk-a",
             "model": ["gpt-4o", {"gpt-4o-mini-2024": "mini"}, "meta/llama-3"]},
            {"provider": "pb", "base_url": f"{b.url}/v1/chat/completions", "api": "sk-b",
             "model": ["gpt-4o", "o1", "pa/odd"]},
        ],
        "api_keys": [
            {"api": "sk-all"},
            {"api": "sk-plain", "model": ["o1", "gpt-4o"]},
            {"api": "sk-prov", "model": ["pb/*", "pa/mini"]},
            {"api": "sk-literal", "model": ["<pa/odd>", "meta/llama-3"]},
            {"api": "sk-upstream-name", "model": ["gpt-4o-mini-2024"]},
            {"api": "sk-chain", "model": ["sk-prov/*", {"pa/gpt-4o": 3}]},
            {"api": "sk-word", "model": "all"},
        ],
    }
    gw = make_gateway(config)
    assert models_of(gw, "sk-all") == ["gpt-4o", "mini", "meta/llama-3", "o1", "pa/odd"]
    assert models_of(gw, "sk-word") == models_of(gw, "sk-all")
    assert models_of(gw, "sk-plain") == ["o1", "gpt-4o"]
    assert models_of(gw, "sk-prov") == ["gpt-4o", "o1", "pa/odd", "mini"]
    assert models_of(gw, "sk-literal") == ["pa/odd", "meta/llama-3"]
    assert models_of(gw, "sk-upstream-name") == []
    assert models_of(gw, "sk-chain") == ["gpt-4o", "o1", "pa/odd", "mini"]
    routes = gw.state.routes
    assert [(c.provider, c.weight) for c in routes["sk-chain"].channels["gpt-4o"]] == [("pb", 0), ("pa", 3)]
    assert [c.provider for c in routes["sk-all"].channels["gpt-4o"]] == ["pa", "pb"]


def test_renamed_model_refuses_its_upstream_name(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, models=[{"gpt-4o-2024-08-06": "gpt-4o"}]))
    with pytest.raises(openai.NotFoundError):
        gw.client("sk-client").chat.completions.create(model="gpt-4o-2024-08-06", messages=USER)


def test_key_as_channel_is_resolved_in_process(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    config["api_keys"].append({"api": "sk-team", "model": ["sk-client/*"]})
    gw = make_gateway(config)
    answer = gw.client("sk-team").chat.completions.create(model="gpt-4o", messages=USER)
    assert answer.choices[0].message.content == "echo: hi"
    assert all(r.path == "/v1/chat/completions" for r in upstream.received)


def test_models_entries_match_the_openai_shape(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, models=["a", "b"]))
    with gw.http("sk-client") as http:
        body = http.get("/v1/models").json()
    assert body["object"] == "list"
    for entry in body["data"]:
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert entry["object"] == "model" and isinstance(entry["created"], int) and entry["owned_by"] == "up0"


def test_provider_without_models_lists_them_at_startup(make_upstream, make_gateway) -> None:
    good, bad = make_upstream(), make_upstream()
    good.models = ["m1", "m2"]
    bad.enqueue(status=500, json={"error": {"message": "down"}})
    config = simple_config(good, bad)
    for provider in config["providers"]:
        del provider["model"]
    gw = make_gateway(config)
    assert models_of(gw, "sk-client") == ["m1", "m2"]
    assert good.received[0].path == "/v1/models" and good.received[0].headers["Authorization"] == "Bearer sk-up0-secret"
    assert gw.client("sk-client").chat.completions.create(model="m2", messages=USER).model == "m2"


# --- The other endpoints ---


def test_embeddings_go_to_the_derived_url(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, models=[{"text-embedding-3-small": "emb"}]))
    answer = gw.client("sk-client").embeddings.create(model="emb", input="hello")
    assert answer.data[0].embedding == [0.1, 0.2] and answer.model == "emb"
    assert upstream.received[-1].path == "/v1/embeddings"
    sent = upstream.received[-1].json
    assert sent["model"] == "text-embedding-3-small" and sent["input"] == "hello"


def test_images_and_moderations_are_forwarded(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, models=["dall-e-3", "omni-moderation-latest"]))
    client = gw.client("sk-client")
    upstream.enqueue(json={"created": 1, "data": [{"url": "https://img/1.png"}]})
    assert client.images.generate(model="dall-e-3", prompt="a cat").data[0].url == "https://img/1.png"
    assert upstream.received[-1].path == "/v1/images/generations"
    upstream.enqueue(json={"id": "modr-1", "model": "omni-moderation-latest", "results": [
        {"flagged": False, "categories": {}, "category_scores": {}}]})
    assert client.moderations.create(input="hello").results[0].flagged is False
    assert upstream.received[-1].path == "/v1/moderations"


def test_transcription_multipart_is_rebuilt_with_upstream_model(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, models=[{"whisper-1": "whisper"}]))
    upstream.enqueue(json={"text": "hello world"})
    answer = gw.client("sk-client").audio.transcriptions.create(
        model="whisper", file=("a.wav", b"RIFF....WAVEfmt ", "audio/wav"), language="en")
    assert answer.text == "hello world"
    received = upstream.received[-1]
    assert received.path == "/v1/audio/transcriptions"
    assert received.headers["Content-Type"].startswith("multipart/form-data")
    plain = received.body.replace(b"Content-Type: text/plain; charset=utf-8\r\n", b"")
    assert b'name="model"\r\n\r\nwhisper-1' in plain
    assert b"RIFF....WAVEfmt " in received.body and b'filename="a.wav"' in received.body


def test_speech_audio_bytes_are_streamed_back(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream, models=["tts-1"]))
    audio = bytes(range(256)) * 400
    upstream.enqueue(raw_chunks=[audio[:50000], audio[50000:]], content_type="audio/mpeg")
    answer = gw.client("sk-client").audio.speech.create(model="tts-1", voice="alloy", input="hi")
    assert answer.content == audio
    assert upstream.received[-1].path == "/v1/audio/speech"


# --- OpenAI-compatible variants ---


def test_azure_uses_deployment_url_api_version_and_api_key(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream, models=[{"my-deploy": "gpt-4o"}])
    config["providers"][0].update(base_url=upstream.url, engine="azure", api_version="2024-06-01")
    gw = make_gateway(config)
    gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER)
    received = upstream.received[-1]
    assert received.path == "/openai/deployments/my-deploy/chat/completions"
    assert received.query == {"api-version": "2024-06-01"}
    assert received.headers["api-key"] == "sk-up0-secret" and "Authorization" not in received.headers


def test_openrouter_sends_attribution_headers(upstream: FakeUpstream, make_gateway) -> None:
    config = simple_config(upstream)
    config["providers"][0]["engine"] = "openrouter"
    gw = make_gateway(config)
    gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER)
    assert upstream.received[-1].headers["X-Title"] == "uni-api"
    assert "HTTP-Referer" in upstream.received[-1].headers


def test_concurrent_requests_get_their_own_answers(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(simple_config(upstream))

    async def run() -> list[str]:
        async with gw.async_client("sk-client") as client:

            async def one(i: int) -> str:
                answer = await client.chat.completions.create(model="gpt-4o",
                                                              messages=[{"role": "user", "content": f"m{i}"}])
                return answer.choices[0].message.content or ""

            return await asyncio.gather(*(one(i) for i in range(40)))

    started = time.monotonic()
    assert asyncio.run(run()) == [f"echo: m{i}" for i in range(40)]
    assert time.monotonic() - started < 20


def test_http_proxy_of_the_provider_carries_the_request(upstream: FakeUpstream, make_gateway, server_loop) -> None:
    from aiohttp import ClientSession, web

    seen: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        async with ClientSession() as session, session.request(
                request.method, str(request.url), data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() not in ("host", "proxy-connection")},
        ) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                content_type=answer.content_type)

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = server_loop.run(start())
    try:
        config = simple_config(upstream)
        config["providers"][0]["preferences"]["proxy"] = f"http://127.0.0.1:{port}"
        gw = make_gateway(config)
        answer = gw.client("sk-client").chat.completions.create(model="gpt-4o", messages=USER)
        assert answer.choices[0].message.content == "echo: hi"
        assert seen == [f"{upstream.url}/v1/chat/completions"]
    finally:
        server_loop.run(runner.cleanup())


def test_channel_without_the_endpoint_is_skipped_without_cooling(make_upstream, make_gateway) -> None:
    claude, openai_up = make_upstream(), make_upstream()
    config = simple_config(openai_up, models=["shared"])
    config["providers"][0]["preferences"]["cooldown_period"] = 300
    config["providers"].insert(0, {"provider": "anthropic", "base_url": f"{claude.url}/v1/messages", "api": "sk-ant",
                                   "engine": "claude", "model": ["shared"], "preferences": {"cooldown_period": 300}})
    config["api_keys"][0]["preferences"] = {"AUTO_RETRY": 1}
    gw = make_gateway(config)
    client = gw.client("sk-client")
    assert client.embeddings.create(model="shared", input="x").data[0].embedding == [0.1, 0.2]
    assert not claude.received and openai_up.received[-1].path == "/v1/embeddings"
    claude.enqueue(json={"id": "msg_1", "type": "message", "role": "assistant", "model": "shared", "content": [
        {"type": "text", "text": "from claude"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2}})
    assert client.chat.completions.create(model="shared", messages=USER).choices[0].message.content == "from claude"
