"""Cloudflare Workers AI adapter: golden fixtures from developers.cloudflare.com, then end to end.

References: REST API "Execute AI model" (POST /client/v4/accounts/{account_id}/ai/run/{model} and its
{result, success, errors, messages} envelope), each text-generation model page's "Messages" input and output
schema (llama-3.1-8b-instruct, llama-4-scout, glm-4.7-flash), "Using streaming", "JSON Mode", "Traditional
function calling", "Model Search" (GET .../ai/models/search) and the bge text-embedding schema.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import (
    FakeUpstream,
    GatewayServer,
    Reply,
    byte_pieces,
    engine_config,
    fixture_sse,
    load_fixture,
    load_fixture_lines,
)
from openai_schema import accumulate_stream, validate, validate_chunk, validate_completion

import adapters

FIXTURES = Path(__file__).parent / "fixtures" / "cloudflare"
load = functools.partial(load_fixture, "cloudflare")
load_jsonl = functools.partial(load_fixture_lines, "cloudflare")
sse_chunks = functools.partial(fixture_sse, "cloudflare")
CLOUDFLARE = adapters.ADAPTERS["cloudflare"]
ACCOUNT = "023e105f4ecef8ad9ca31a8372d0c353"
MODEL = "@cf/meta/llama-3.1-8b-instruct"
PROVIDER = adapters.Provider("cf", "cloudflare", "https://api.cloudflare.com", api_keys=("cf-secret",),
                             models=(("llama", MODEL),), extra={"cf_account_id": ACCOUNT})
TARGET = adapters.Target(PROVIDER, MODEL, "cf-secret")
RUN_URL = f"https://api.cloudflare.com/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
GENERATED_ID = re.compile(r"^(chatcmpl-|call_)[0-9a-f]{32}$")


def scrub(value: Any) -> Any:
    """Ids the adapter generates (Workers AI sends none) as the fixtures' placeholders."""
    if isinstance(value, dict):
        return {k: (GENERATED_ID.sub(r"\g<1>" + "0" * 32, v) if k == "id" and isinstance(v, str) else scrub(v))
                for k, v in value.items()}
    return [scrub(v) for v in value] if isinstance(value, list) else value


async def convert_stream(name: str, include_usage: bool = False) -> list[dict[str, Any]]:
    events = adapters.iter_sse(byte_pieces((FIXTURES / name).read_bytes(), 9))
    return [chunk async for chunk in CLOUDFLARE.parse_stream(events, "llama", include_usage=include_usage)]


# --- Request side ---


@pytest.mark.parametrize("case", ["text", "tools", "openai"])
def test_cloudflare_request_matches_golden_body(case: str) -> None:
    request = CLOUDFLARE.build_request(load(f"{case}.request.json"), TARGET)
    assert (request.method, request.url) == ("POST", RUN_URL)
    assert request.headers == {"Authorization": "Bearer cf-secret"}
    assert request.json == load(f"{case}.native.json")


def test_cloudflare_embeddings_request_matches_golden_body() -> None:
    target = adapters.Target(PROVIDER, "@cf/baai/bge-base-en-v1.5", "cf-secret")
    request = CLOUDFLARE.build_endpoint_request("embeddings", load("embeddings.request.json"), target)
    assert request.url == f"https://api.cloudflare.com/client/v4/accounts/{ACCOUNT}/ai/run/@cf/baai/bge-base-en-v1.5"
    assert request.json == load("embeddings.native.json")


def test_cloudflare_single_embedding_input_becomes_a_list() -> None:
    request = CLOUDFLARE.build_endpoint_request("embeddings", {"model": "bge", "input": "hello"}, TARGET)
    assert request.json == {"text": ["hello"]}


def test_cloudflare_provider_without_tools_sends_none() -> None:
    provider = adapters.Provider("cf", "cloudflare", "https://api.cloudflare.com", tools=False,
                                 extra={"cf_account_id": ACCOUNT})
    payload = CLOUDFLARE.build_request(load("tools.request.json"), adapters.Target(provider, MODEL, "k")).json
    assert "tools" not in payload and "tool_choice" not in payload


def test_cloudflare_rejects_content_it_cannot_carry() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
    with pytest.raises(adapters.UpstreamError) as caught:
        CLOUDFLARE.build_request(body, TARGET)
    assert caught.value.status == 400 and not caught.value.retryable


def test_cloudflare_models_request_searches_text_generation() -> None:
    request = CLOUDFLARE.build_models_request(adapters.Target(PROVIDER, "", "cf-secret"))
    assert request.method == "GET"
    assert request.url == (f"https://api.cloudflare.com/client/v4/accounts/{ACCOUNT}/ai/models/search"
                           "?task=Text%20Generation&per_page=100")


def test_cloudflare_native_json_mode_is_left_alone() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}}
    assert "response_format" not in CLOUDFLARE.build_request(body, TARGET).json


# --- Response side ---


@pytest.mark.parametrize("case", ["text", "tools", "openai"])
def test_cloudflare_response_converts_to_golden(case: str) -> None:
    converted = CLOUDFLARE.parse_response(load(f"{case}.upstream.json"), "llama")
    assert scrub(converted) == load(f"{case}.expected.json")
    validate_completion(converted)


def test_cloudflare_json_mode_object_answer_becomes_a_json_string() -> None:
    native = {"result": {"response": {"name": "India", "capital": "New Delhi"}}, "success": True, "errors": []}
    content = CLOUDFLARE.parse_response(native, "llama")["choices"][0]["message"]["content"]
    assert json.loads(content) == {"name": "India", "capital": "New Delhi"}


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "include_usage"), [("text", True), ("tools", False), ("openai", True)])
async def test_cloudflare_stream_converts_to_golden(case: str, include_usage: bool) -> None:
    chunks = await convert_stream(f"{case}.upstream.sse", include_usage)
    assert scrub(chunks) == load_jsonl(f"{case}.expected.jsonl")
    for chunk in chunks:
        validate_chunk(chunk)


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["text", "tools", "openai"])
async def test_cloudflare_accumulated_stream_equals_response(case: str) -> None:
    folded = scrub(accumulate_stream(await convert_stream(f"{case}.upstream.sse", include_usage=True)))
    completion = scrub(CLOUDFLARE.parse_response(load(f"{case}.upstream.json"), "llama"))
    choice = completion["choices"][0]
    assert folded["message"] == {k: v for k, v in choice["message"].items() if k != "refusal"}
    assert folded["usage"] == completion["usage"]
    assert folded["finish_reason"] == ("length" if case == "openai" else choice["finish_reason"])


@pytest.mark.anyio
async def test_cloudflare_stream_cut_before_done_raises() -> None:
    sse = (FIXTURES / "text.upstream.sse").read_bytes().replace(b"data: [DONE]\n\n", b"")
    with pytest.raises(adapters.UpstreamError, match="before \\[DONE\\]"):
        [chunk async for chunk in CLOUDFLARE.parse_stream(adapters.iter_sse(byte_pieces(sse, 9)), "llama")]


@pytest.mark.anyio
async def test_cloudflare_stream_error_event_raises() -> None:
    sse = b'data: {"errors": [{"code": 3040, "message": "Capacity temporarily exceeded"}]}\n\n'
    with pytest.raises(adapters.UpstreamError, match="Capacity temporarily exceeded"):
        [chunk async for chunk in CLOUDFLARE.parse_stream(adapters.iter_sse(byte_pieces(sse, 9)), "llama")]


def test_cloudflare_unsuccessful_envelope_is_an_error() -> None:
    with pytest.raises(adapters.UpstreamError, match="Capacity temporarily exceeded"):
        CLOUDFLARE.parse_response(load("error_429.upstream.json"), "llama")


def test_cloudflare_embeddings_convert_to_golden() -> None:
    converted = CLOUDFLARE.parse_endpoint_response("embeddings", load("embeddings.upstream.json"), "bge")
    assert converted == load("embeddings.expected.json")
    validate(converted, "CreateEmbeddingResponse")


@pytest.mark.parametrize(("fixture", "status", "message"), [
    ("error_400.upstream.json", 400, "Error: oneOf at '/' not met"),
    ("error_401.upstream.json", 401, "Authentication error (code 10000)"),
    ("error_429.upstream.json", 429, "Capacity temporarily exceeded, please try again. (code 3040)"),
])
def test_cloudflare_error_envelopes_give_their_message(fixture: str, status: int, message: str) -> None:
    error = CLOUDFLARE.parse_error(status, (FIXTURES / fixture).read_bytes(), 3.0)
    assert error.status == status and error.message.startswith(message)
    assert error.retryable is (status != 400) and error.retry_after == 3.0


def test_cloudflare_error_without_envelope_falls_back_to_the_body() -> None:
    assert CLOUDFLARE.parse_error(502, b"Bad Gateway").message == "Bad Gateway"


def test_cloudflare_models_list_gives_names() -> None:
    assert CLOUDFLARE.parse_models(load("models.upstream.json")) == [
        "@cf/meta/llama-3.1-8b-instruct", "@cf/meta/llama-3.3-70b-instruct-fp8-fast"]


@pytest.mark.parametrize(("base_url", "engine"), [
    ("https://api.cloudflare.com", "cloudflare"),
    ("https://api.cloudflare.com/client/v4", "cloudflare"),
    (f"https://api.cloudflare.com/client/v4/accounts/{ACCOUNT}/ai/v1/chat/completions", "gpt"),
    ("https://gateway.ai.cloudflare.com/v1/acct/gw/openai/chat/completions", "gpt"),
])
def test_cloudflare_engine_is_inferred_from_base_url(base_url: str, engine: str) -> None:
    assert adapters.infer_engine(base_url) == engine


# --- End to end through the gateway ---

MakeGateway = Callable[..., GatewayServer]


cloudflare_config = functools.partial(engine_config, "cloudflare", cf_account_id=ACCOUNT)


LLAMA = [{MODEL: "llama"}]


def test_gateway_answers_workers_ai_through_the_openai_sdk(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("tools.upstream.json")))
    gateway = make_gateway(cloudflare_config(upstream, models=LLAMA))
    request = {**load("tools.request.json"), "stream": False}
    answer = gateway.client("sk-client").chat.completions.create(**request)
    calls = answer.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments)["latitude"] for c in calls] == ["51.5074", "48.8566"]
    assert len({c.id for c in calls}) == 2 and answer.choices[0].finish_reason == "tool_calls"
    sent = upstream.received[0]
    assert sent.path == f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
    assert sent.headers["Authorization"] == "Bearer cf-secret-0"
    assert sent.json == {**load("tools.native.json"), "stream": False}
    validate_completion(answer.model_dump(exclude_unset=True))


def test_gateway_streams_workers_ai_with_usage(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(raw_chunks=sse_chunks("text.upstream.sse")))
    gateway = make_gateway(cloudflare_config(upstream, models=LLAMA))
    request = {**load("text.request.json"), "stream": True}
    extra = {"repetition_penalty": request.pop("repetition_penalty")}
    chunks = [c.model_dump(exclude_unset=True) for c in
              gateway.client("sk-client").chat.completions.create(**request, extra_body=extra)]
    for chunk in chunks:
        validate_chunk(chunk)
    folded = accumulate_stream(chunks)
    assert folded["message"]["content"] == "Pizza combines crispy crust, tangy sauce and melted cheese."
    assert folded["finish_reason"] == "stop" and folded["usage"]["total_tokens"] == 40
    assert chunks[-1]["choices"] == []


def test_gateway_inlines_http_images_for_workers_ai(make_upstream: Callable[[], FakeUpstream],
                                                    make_gateway: MakeGateway) -> None:
    images, upstream = make_upstream(), make_upstream()
    images.enqueue(Reply(body=b"\x89PNG", content_type="image/png"))
    upstream.enqueue(Reply(json=load("openai.upstream.json")))
    gateway = make_gateway(cloudflare_config(upstream, models=LLAMA))
    gateway.client("sk-client").chat.completions.create(model="llama", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"{images.url}/cat.png"}}]}])
    part = upstream.received[0].json["messages"][0]["content"][1]
    assert part == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}}


def test_gateway_passes_workers_ai_400_through(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(status=400, json=load("error_400.upstream.json")))
    gateway = make_gateway(cloudflare_config(upstream, models=LLAMA))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client("sk-client").chat.completions.create(model="llama", messages=[{"role": "user",
                                                                                      "content": "hi"}])
    assert "oneOf at '/' not met" in caught.value.message


def test_gateway_fails_over_from_a_busy_workers_ai_channel(make_upstream: Callable[[], FakeUpstream],
                                                           make_gateway: MakeGateway) -> None:
    busy, healthy = make_upstream(), make_upstream()
    busy.enqueue(Reply(status=429, json=load("error_429.upstream.json")))
    healthy.enqueue(Reply(raw_chunks=sse_chunks("openai.upstream.sse")))
    gateway = make_gateway(cloudflare_config(busy, healthy, models=LLAMA))
    chunks = list(gateway.client("sk-client").chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == '{"object": "a cat"}'
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(busy.received) == 1 and len(healthy.received) == 1


def test_gateway_serves_embeddings_from_workers_ai(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("embeddings.upstream.json")))
    gateway = make_gateway(cloudflare_config(upstream, models=[{"@cf/baai/bge-base-en-v1.5": "bge"}]))
    answer = gateway.client("sk-client").embeddings.create(**load("embeddings.request.json"))
    assert [e.embedding for e in answer.data] == [[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]]
    assert upstream.received[0].path.endswith("/ai/run/@cf/baai/bge-base-en-v1.5")
    assert upstream.received[0].json == load("embeddings.native.json")


def test_gateway_discovers_workers_ai_models(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=load("models.upstream.json")))
    gateway = make_gateway(cloudflare_config(upstream))
    assert [m.id for m in gateway.client("sk-client").models.list().data] == [
        "@cf/meta/llama-3.1-8b-instruct", "@cf/meta/llama-3.3-70b-instruct-fp8-fast"]
    sent = upstream.received[0]
    assert sent.path == f"/client/v4/accounts/{ACCOUNT}/ai/models/search"
    assert sent.query == {"task": "Text Generation", "per_page": "100"}
