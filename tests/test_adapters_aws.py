"""Amazon Bedrock (engine `aws`, Claude models): SigV4 signing, AWS event-stream framing, InvokeModel requests.

References: AWS IAM User Guide "Create a signed AWS API request" and the Signature Version 4 test suite
(get-vanilla, post-vanilla, get-vanilla-query-order-key-case, IAM ListUsers example); "Event stream encoding"
(Amazon Transcribe / Lex V2 developer guides); Bedrock API reference "InvokeModel",
"InvokeModelWithResponseStream", "ResponseStream", "PayloadPart"; "Anthropic Claude Messages API" inference
parameters (anthropic_version bedrock-2023-05-31). Claude event streams reuse tests/fixtures/claude.
"""

from __future__ import annotations

import base64
import calendar
import datetime
import json
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import FakeUpstream, GatewayServer, Reply, byte_pieces
from openai_schema import accumulate_stream, validate_chunk, validate_completion

import adapters
from adapters import Provider, Target, UpstreamError

CLAUDE_FIXTURES = Path(__file__).parent / "fixtures" / "claude"
BEDROCK = adapters.ADAPTERS["aws"]
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # the AWS documentation's example secret
CREDENTIALS = {"aws_access_key": "AKIDEXAMPLE", "aws_secret_key": SECRET}
NOW = calendar.timegm((2015, 8, 30, 12, 36, 0))  # 20150830T123600Z, the test suite's clock
MODEL_ID = "anthropic.claude-3-5-sonnet-20241022-v2:0"
USER = {"role": "user", "content": "hi"}


def provider(base_url: str = BEDROCK.default_base_url, **extra: str) -> Provider:
    return Provider("bedrock", "aws", base_url, extra={**CREDENTIALS, "region": "us-east-1", **extra})


# --- Signature Version 4 ---


@pytest.mark.parametrize(("method", "url", "headers", "service", "expected"), [
    ("GET", "https://example.amazonaws.com/", {}, "service",  # test suite: get-vanilla
     "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    ("POST", "https://example.amazonaws.com/", {}, "service",  # test suite: post-vanilla
     "SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ("GET", "https://example.amazonaws.com/?Param2=value2&Param1=value1", {}, "service",  # ...query-order-key-case
     "SignedHeaders=host;x-amz-date, Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
    ("GET", "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08",  # IAM User Guide example
     {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}, "iam",
     "SignedHeaders=content-type;host;x-amz-date, "
     "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"),
])
def test_sigv4_reproduces_the_documented_signatures(method: str, url: str, headers: dict[str, str], service: str,
                                                    expected: str) -> None:
    signed = adapters.sign_aws_v4(method, url, headers, b"", access_key="AKIDEXAMPLE", secret_key=SECRET,
                                  region="us-east-1", service=service, now=NOW)
    assert signed["X-Amz-Date"] == "20150830T123600Z"
    assert signed["Authorization"] == (
        f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/{service}/aws4_request, {expected}")
    assert {k: v for k, v in signed.items() if k not in ("X-Amz-Date", "Authorization")} == headers


def botocore_authorization(method: str, url: str, headers: dict[str, str], body: bytes, region: str,
                           now: float, monkeypatch: pytest.MonkeyPatch) -> str:
    """botocore's own SigV4 signer, its clock pinned to `now`."""
    auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None)
    monkeypatch.setattr(auth, "get_current_datetime", lambda *args, **kwargs: moment)
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    auth.SigV4Auth(Credentials("AKIDEXAMPLE", SECRET), "bedrock", region).add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize(("model", "stream"), [
    (MODEL_ID, False),
    (MODEL_ID, True),
    ("arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.anthropic.claude-3-7-sonnet-20250219-v1:0", True),
])
def test_bedrock_signature_equals_botocores(model: str, stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    target = Target(provider(region="eu-west-1"), model, now=NOW + 12345.6)
    request = BEDROCK.build_request({"messages": [USER], "stream": stream}, target)
    assert request.data is not None and request.json is None
    expected = botocore_authorization("POST", request.url, {"Content-Type": "application/json"}, request.data,
                                      "eu-west-1", target.now, monkeypatch)
    assert request.headers["Authorization"] == expected
    assert request.headers["X-Amz-Date"] == "20150830T160145Z"


# --- Event-stream framing ---


def encode_frame(headers: dict[str, Any], payload: bytes) -> bytes:
    """One event-stream message; str values are string headers (type 7), (type, bytes) pairs are raw."""
    raw = b""
    for name, value in headers.items():
        kind, data = (7, value.encode()) if isinstance(value, str) else value
        length = struct.pack(">H", len(data)) if kind in (6, 7) else b""
        raw += bytes([len(name)]) + name.encode() + bytes([kind]) + length + data
    prelude = struct.pack(">II", 16 + len(raw) + len(payload), len(raw))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw + payload
    return message + struct.pack(">I", zlib.crc32(message))


def chunk_frame(event: dict[str, Any]) -> bytes:
    """A Bedrock `chunk` event carrying one Anthropic stream event (PayloadPart: base64 `bytes`, padding `p`)."""
    payload = {"bytes": base64.b64encode(json.dumps(event).encode()).decode(), "p": "abcdefghijklmnopqrstuvwxyz"}
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    return encode_frame(headers, json.dumps(payload).encode())


def exception_frame(name: str, message: str) -> bytes:
    headers = {":exception-type": name, ":content-type": "application/json", ":message-type": "exception"}
    return encode_frame(headers, json.dumps({"message": message}).encode())


def claude_events(name: str) -> list[dict[str, Any]]:
    text = (CLAUDE_FIXTURES / name).read_text()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def frames(data: bytes, size: int = 1) -> list[tuple[dict[str, Any], bytes]]:
    return [frame async for frame in adapters.iter_aws_frames(byte_pieces(data, size))]


# The examples of the Elixir `event_stream` package docs: {"foo": "bar"} bare, then with a content-type header.
KNOWN_FRAMES = [
    (bytes([0, 0, 0, 30, 0, 0, 0, 0, 186, 242, 246, 138]) + b'{"foo": "bar"}' + bytes([174, 114, 88, 228]),
     {}),
    (bytes([0, 0, 0, 62, 0, 0, 0, 32, 64, 93, 249, 70, 12]) + b"content-type" + bytes([7, 0, 16])
     + b'application/json{"foo": "bar"}' + bytes([111, 162, 191, 59]), {"content-type": "application/json"}),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("data", "headers"), KNOWN_FRAMES)
async def test_event_stream_decodes_known_messages_byte_by_byte(data: bytes, headers: dict[str, str]) -> None:
    assert await frames(data) == [(headers, b'{"foo": "bar"}')]
    assert encode_frame(headers, b'{"foo": "bar"}') == data


@pytest.mark.anyio
async def test_event_stream_decodes_every_header_type() -> None:
    headers = {"t": (0, b""), "f": (1, b""), "byte": (2, b"\xff"), "short": (3, b"\x01\x00"),
               "int": (4, b"\x00\x00\x01\x00"), "long": (5, b"\xff" * 8), "bytes": (6, b"\x00\x01"),
               "str": ":)", "time": (8, (1700000000000).to_bytes(8, "big")), "uuid": (9, bytes(range(16)))}
    ((decoded, payload),) = await frames(encode_frame(headers, b"x"), size=5)
    assert decoded == {"t": True, "f": False, "byte": -1, "short": 256, "int": 256, "long": -1,
                       "bytes": b"\x00\x01", "str": ":)", "time": 1700000000000, "uuid": bytes(range(16))}
    assert payload == b"x"


@pytest.mark.anyio
async def test_event_stream_agrees_with_botocores_parser() -> None:
    eventstream = pytest.importorskip("botocore.eventstream")
    data = b"".join(chunk_frame(e) for e in claude_events("tool_use_stream.upstream.sse"))
    buffer = eventstream.EventStreamBuffer()
    buffer.add_data(data)
    assert [(m.headers, m.payload) for m in buffer] == await frames(data, size=13)


@pytest.mark.anyio
@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: d[:9] + bytes([d[9] ^ 1]) + d[10:], "prelude"),  # prelude CRC
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad CRC"),  # message CRC
    (lambda d: d[:20], "ended inside a message"),
    (lambda d: encode_frame({"x": (42, b"")}, b"{}"), "malformed"),  # no header value type 42
    (lambda d: encode_frame({"x": (7, b"\xff")}, b"{}"), "malformed"),  # a string header that is not UTF-8
])
async def test_event_stream_rejects_damaged_messages(damage: Callable[[bytes], bytes], message: str) -> None:
    data = damage(encode_frame({":message-type": "event"}, b"{}"))
    with pytest.raises(UpstreamError) as caught:
        await frames(data, size=4)
    assert caught.value.status == 502 and message in caught.value.message


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "status", "retryable"), [
    ("throttlingException", 429, True), ("validationException", 400, False),
    ("modelStreamErrorException", 424, True), ("serviceUnavailableException", 503, True),
])
async def test_bedrock_stream_exceptions_raise_with_documented_status(name: str, status: int,
                                                                      retryable: bool) -> None:
    data = chunk_frame(claude_events("basic_stream.upstream.sse")[0]) + exception_frame(name, "Too many tokens")
    with pytest.raises(UpstreamError) as caught:
        [event async for event in BEDROCK.iter_events(byte_pieces(data, 10))]
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert caught.value.message == f"{name}: Too many tokens"


STREAM_CASES = ["basic_stream", "tool_use_stream", "thinking_stream"]


@pytest.mark.anyio
@pytest.mark.parametrize("case", STREAM_CASES)
async def test_bedrock_stream_converts_like_the_anthropic_one(case: str) -> None:
    data = b"".join(chunk_frame(event) for event in claude_events(f"{case}.upstream.sse"))
    include_usage = case == "basic_stream"
    stream = BEDROCK.parse_stream(BEDROCK.iter_events(byte_pieces(data, 64)), "claude-3-5-sonnet",
                                  include_usage=include_usage)
    chunks = [{**chunk, "id": "chatcmpl-test", "created": 0} async for chunk in stream]
    for chunk in chunks:
        validate_chunk(chunk)
    expected = (CLAUDE_FIXTURES / f"{case}.expected.jsonl").read_text().splitlines()
    assert chunks == [json.loads(line) for line in expected]


# --- Requests, errors, models ---


def test_bedrock_request_is_invoke_model_with_the_bedrock_envelope() -> None:
    body = {"model": "claude-3-5-sonnet", "messages": [USER], "max_tokens": 100, "stream": True,
            "stream_options": {"include_usage": True}}
    request = BEDROCK.build_request(body, Target(provider(region="eu-central-1"), MODEL_ID, now=NOW))
    assert request.url == f"https://bedrock-runtime.eu-central-1.amazonaws.com/model/{MODEL_ID}/invoke-with-response-stream"
    assert json.loads(request.data or b"") == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100,
                                               "messages": [{"role": "user", "content": [{"type": "text",
                                                                                          "text": "hi"}]}]}
    assert request.stream and request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-central-1/bedrock/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, Signature=")


@pytest.mark.parametrize(("base_url", "region", "url"), [
    ("https://bedrock-runtime.ap-northeast-1.amazonaws.com", "", "https://bedrock-runtime.ap-northeast-1.amazonaws.com"),
    ("https://bedrock-runtime.us-east-1.amazonaws.com", "us-west-2", "https://bedrock-runtime.us-west-2.amazonaws.com"),
    ("http://127.0.0.1:9/bedrock/", "eu-west-3", "http://127.0.0.1:9/bedrock"),
])
def test_bedrock_honours_base_url_and_signs_for_its_region(base_url: str, region: str, url: str) -> None:
    target = Target(provider(base_url, region=region), "arn:aws:bedrock:x:1:inference-profile/p", now=NOW)
    request = BEDROCK.build_request({"messages": [USER]}, target)
    assert request.url == f"{url}/model/arn:aws:bedrock:x:1:inference-profile%2Fp/invoke"
    signed_region = region if url.startswith("http://") else url.split(".")[1]
    assert f"/20150830/{signed_region}/bedrock/aws4_request" in request.headers["Authorization"]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"message":"Malformed input request: #: required key [max_tokens] not found"}', 400,
     "Malformed input request: #: required key [max_tokens] not found"),
    (b'{"Message":"User: arn:aws:iam::1:user/x is not authorized to perform: bedrock:InvokeModel"}', 403,
     "User: arn:aws:iam::1:user/x is not authorized to perform: bedrock:InvokeModel"),
])
def test_bedrock_error_bodies_give_their_message(body: bytes, status: int, message: str) -> None:
    error = BEDROCK.parse_error(status, body)
    assert (error.status, error.message) == (status, message)


def test_bedrock_lists_anthropic_models_on_the_control_plane_host() -> None:
    # Bedrock API Reference, "ListFoundationModels": GET /foundation-models on bedrock.<region>, SigV4-signed.
    request = BEDROCK.build_models_request(Target(provider(region="us-west-2"), "", now=NOW))
    assert request.method == "GET"
    assert request.url == "https://bedrock.us-west-2.amazonaws.com/foundation-models?byProvider=Anthropic"
    expected = adapters.sign_aws_v4("GET", request.url, {}, b"", access_key="AKIDEXAMPLE", secret_key=SECRET,
                                    region="us-west-2", service="bedrock", now=NOW)
    assert request.headers["Authorization"] == expected["Authorization"]
    assert BEDROCK.parse_models({"modelSummaries": [{"modelId": MODEL_ID, "providerName": "Anthropic"}]}) == [MODEL_ID]
    with pytest.raises(UpstreamError):
        BEDROCK.parse_models({"models": []})


# --- End to end through the gateway ---

MakeGateway = Callable[..., GatewayServer]


def bedrock_config(upstream: FakeUpstream) -> dict[str, Any]:
    bedrock = {"provider": "bedrock", "base_url": upstream.url, "engine": "aws", "region": "us-west-2",
               **CREDENTIALS, "model": [{MODEL_ID: "claude-3-5-sonnet"}]}
    return {"providers": [bedrock], "api_keys": [{"api": "sk-client"}]}


def assert_signed(received: Any, upstream: FakeUpstream) -> None:
    """The signature checks out for what arrived: path, Host, Content-Type, X-Amz-Date and body bytes."""
    moment = calendar.timegm(datetime.datetime.strptime(received.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").timetuple())
    assert abs(moment - time.time()) < 300  # signed with the gateway's clock
    assert received.headers["Host"] == upstream.url.removeprefix("http://")
    expected = adapters.sign_aws_v4("POST", upstream.url + received.path, {"Content-Type": "application/json"},
                                    received.body, access_key="AKIDEXAMPLE", secret_key=SECRET, region="us-west-2",
                                    service="bedrock", now=moment)
    assert received.headers["Authorization"] == expected["Authorization"]
    assert "/us-west-2/bedrock/aws4_request" in expected["Authorization"]


def test_gateway_answers_bedrock_claude_through_the_openai_sdk(upstream: FakeUpstream,
                                                               make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(json=json.loads((CLAUDE_FIXTURES / "tool_use.upstream.json").read_text())))
    gateway = make_gateway(bedrock_config(upstream))
    answer = gateway.client("sk-client").chat.completions.create(model="claude-3-5-sonnet", messages=[USER])
    validate_completion(answer.model_dump(exclude_unset=True))
    (call,) = answer.choices[0].message.tool_calls or ()
    assert json.loads(call.function.arguments) == {"location": "San Francisco, CA", "unit": "celsius"}
    received = upstream.received[0]
    assert received.path == f"/model/{MODEL_ID}/invoke"
    assert received.json["anthropic_version"] == "bedrock-2023-05-31" and "model" not in received.json
    assert_signed(received, upstream)


def test_bedrock_without_model_list_discovers_models_at_startup(upstream: FakeUpstream,
                                                               make_gateway: MakeGateway) -> None:
    config = bedrock_config(upstream)
    del config["providers"][0]["model"]
    upstream.enqueue(Reply(json={"modelSummaries": [{"modelId": MODEL_ID, "providerName": "Anthropic"}]}))
    gateway = make_gateway(config)
    assert [m.id for m in gateway.client("sk-client").models.list()] == [MODEL_ID]
    listing = upstream.received[0]
    assert listing.path == "/foundation-models" and listing.query == {"byProvider": "Anthropic"}
    assert "/us-west-2/bedrock/aws4_request" in listing.headers["Authorization"]


def test_gateway_streams_bedrock_event_stream(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    data = b"".join(chunk_frame(event) for event in claude_events("tool_use_stream.upstream.sse"))
    pieces = [data[i:i + 50] for i in range(0, len(data), 50)]  # frames split across network writes
    upstream.enqueue(Reply(raw_chunks=pieces, content_type="application/vnd.amazon.eventstream"))
    gateway = make_gateway(bedrock_config(upstream))
    stream = gateway.client("sk-client").chat.completions.create(
        model="claude-3-5-sonnet", messages=[USER], stream=True, stream_options={"include_usage": True})
    chunks = [chunk.model_dump(exclude_unset=True) for chunk in stream]
    for chunk in chunks:
        validate_chunk(chunk)
    folded = accumulate_stream(chunks)
    assert folded["message"]["content"] == "Okay, let's check the weather for San Francisco, CA:"
    assert json.loads(folded["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "location": "San Francisco, CA", "unit": "fahrenheit"}
    assert folded["finish_reason"] == "tool_calls" and folded["usage"]["total_tokens"] == 561
    received = upstream.received[0]
    assert received.path == f"/model/{MODEL_ID}/invoke-with-response-stream" and "stream" not in received.json
    assert_signed(received, upstream)


def test_gateway_passes_a_bedrock_validation_error_through(upstream: FakeUpstream,
                                                          make_gateway: MakeGateway) -> None:
    upstream.enqueue(Reply(status=400, json={"message": "messages: roles must alternate"},
                           headers={"x-amzn-ErrorType": "ValidationException:http://internal.amazon.com/coral/"}))
    gateway = make_gateway(bedrock_config(upstream))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client("sk-client").chat.completions.create(model="claude-3-5-sonnet", messages=[USER])
    assert "roles must alternate" in caught.value.message


def test_gateway_starts_when_bedrock_refuses_to_list_its_models(upstream: FakeUpstream,
                                                                make_gateway: MakeGateway) -> None:
    config = bedrock_config(upstream)
    del config["providers"][0]["model"]
    upstream.enqueue(Reply(status=403, json={"message": "not authorized to perform bedrock:ListFoundationModels"}))
    gateway = make_gateway(config)
    assert gateway.client("sk-client").models.list().data == []
    assert [r.path for r in upstream.received] == ["/foundation-models"]
