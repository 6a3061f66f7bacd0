"""Upstream faults on every engine's wire format, stream and non-stream, through the real gateway.

Each engine gets one gateway with three providers: `faulty` and `healthy` serve alias `m` (in that order),
`dead` (a port nobody listens on) and `healthy` serve alias `r`. A fault scripted on `faulty` must end in
failover to `healthy` when nothing was sent to the client yet, or in an error chunk then `[DONE]` when the
stream had started; a tolerable oddity (a slow drip, a garbage SSE line) is served by `faulty` itself.
Never a hang (every client call has a 15 s timeout) and never a 500.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import pytest
from conftest import (
    FIXTURES,
    FakeUpstream,
    GatewayServer,
    Reply,
    ServerLoop,
    chunks,
    completion,
    free_port,
    sse_pieces,
    to_yaml,
)
from test_adapters_aws import chunk_frame, claude_events

import adapters
import uni_api

TIMEOUT = 0.5  # model_timeout: how long a stall lasts before the attempt fails
Outcome = Literal["failover", "served", "interrupted"]


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _sse_data(events: list[Any]) -> list[bytes]:
    return [b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n" for e in events]


@dataclass(frozen=True)
class Engine:
    """One wire format: how a provider entry looks, and a good answer in both modes with its text."""

    name: str
    provider: Callable[[str], dict[str, Any]]
    upstream_model: str
    good: Callable[[], bytes]
    stream: Callable[[], list[bytes]]
    text: str
    stream_text: str
    stream_type: str = "text/event-stream"
    needs_terminal: bool = True  # does the stream count as cut short without its last event?


AWS_CREDENTIALS = {"aws_access_key": "AKIDEXAMPLE", "aws_secret_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}

ENGINES: tuple[Engine, ...] = (
    Engine("gpt", lambda url: {"base_url": f"{url}/v1/chat/completions", "api": "sk-gpt-secret-0000"}, "gpt-4o",
           lambda: json.dumps(completion("Fine, thanks.")).encode(), lambda: _sse_data(chunks(["Fine,", " thanks."])),
           "Fine, thanks.", "Fine, thanks.", needs_terminal=False),
    Engine("claude", lambda url: {"base_url": f"{url}/v1/messages", "api": "sk-ant-secret-0000"},
           "claude-3-5-sonnet-20241022", lambda: _fixture("claude/basic.upstream.json"),
           lambda: sse_pieces(_fixture("claude/basic_stream.upstream.sse")), "Hi! My name is Claude.", "Hello!",
           needs_terminal=False),  # message_delta already carried the stop reason
    Engine("gemini", lambda url: {"base_url": f"{url}/v1beta", "api": "AIza-gemini-secret-0000"}, "gemini-2.0-flash",
           lambda: _fixture("gemini/text.upstream.json"), lambda: sse_pieces(_fixture("gemini/text.upstream.sse")),
           "A small orange cat, sitting in the sun.", "A small orange cat, sitting in the sun."),
    Engine("cohere", lambda url: {"base_url": f"{url}/v2/chat", "api": "co-secret-0000"}, "command-a-03-2025",
           lambda: _fixture("cohere/text.upstream.json"), lambda: sse_pieces(_fixture("cohere/text.upstream.sse")),
           '{"text": "LLMs are neural networks trained on large text corpora."}',
           '{"text": "LLMs are neural networks trained on large text corpora."}'),
    Engine("cloudflare", lambda url: {"base_url": url, "api": "cf-secret-0000", "cf_account_id": "acct0"},
           "@cf/meta/llama-3.1-8b-instruct", lambda: _fixture("cloudflare/text.upstream.json"),
           lambda: sse_pieces(_fixture("cloudflare/text.upstream.sse")),
           "Pizza combines crispy crust, tangy sauce and melted cheese.",
           "Pizza combines crispy crust, tangy sauce and melted cheese."),
    Engine("aws", lambda url: {"base_url": url, "region": "us-west-2", **AWS_CREDENTIALS},
           "anthropic.claude-3-5-sonnet-20241022-v2:0", lambda: _fixture("claude/basic.upstream.json"),
           lambda: [chunk_frame(e) for e in claude_events("basic_stream.upstream.sse")], "Hi! My name is Claude.",
           "Hello!", "application/vnd.amazon.eventstream", needs_terminal=False),
)


def engine_config(engine: Engine, faulty: str, healthy: str, dead: str) -> dict[str, Any]:
    def entry(name: str, url: str, aliases: list[str]) -> dict[str, Any]:
        return {"provider": name, "engine": engine.name, **engine.provider(url),
                "model": [{engine.upstream_model: alias} for alias in aliases], "preferences": {"cooldown_period": 0}}

    return {"providers": [entry("faulty", faulty, ["m"]), entry("dead", dead, ["r"]),
                          entry("healthy", healthy, ["m", "r"])],
            "api_keys": [{"api": "sk-client"}],
            "preferences": {"model_timeout": TIMEOUT, "request_timeout": 0}}


@dataclass
class Rig:
    engine: Engine
    gateway: GatewayServer
    faulty: FakeUpstream
    healthy: FakeUpstream

    def reset(self) -> None:
        for upstream in (self.faulty, self.healthy):
            upstream.queue.clear()
            upstream.received.clear()


@pytest.fixture(scope="module")
def rigs(server_loop: ServerLoop) -> Iterator[Callable[[Engine], Rig]]:
    """One gateway and two fake upstreams per engine, started on first use and shared by the module's tests."""
    made: dict[str, Rig] = {}

    def get(engine: Engine) -> Rig:
        if engine.name not in made:
            faulty, healthy = FakeUpstream(server_loop), FakeUpstream(server_loop)
            for upstream in (faulty, healthy):
                server_loop.run(upstream.start())
            config = engine_config(engine, faulty.url, healthy.url, f"http://127.0.0.1:{free_port()}")
            gateway = GatewayServer(server_loop, uni_api.parse_config(to_yaml(config), "api.yaml"))
            gateway.start()
            made[engine.name] = Rig(engine, gateway, faulty, healthy)
        made[engine.name].reset()
        return made[engine.name]

    yield get
    for rig in made.values():
        rig.gateway.stop()
        for upstream in (rig.faulty, rig.healthy):
            server_loop.run(upstream.stop())


# --- Faults: (name, reply on `faulty` for an engine, expected outcome) per mode ---

Fault = Callable[[Engine], Reply]


def _body(engine: Engine, stream: bool) -> list[bytes]:
    return engine.stream() if stream else [engine.good()]


def _reply(engine: Engine, stream: bool, pieces: list[bytes], **knobs: Any) -> Reply:
    kind = engine.stream_type if stream else "application/json"
    return Reply(raw_chunks=pieces, content_type=kind, **knobs)


def _halves(engine: Engine, stream: bool) -> list[bytes]:
    """The answer cut inside its first event (or the JSON body), as two writes."""
    pieces = _body(engine, stream)
    first = pieces[0]
    return [first[: len(first) // 2], first[len(first) // 2:], *pieces[1:]]


def _padded_first_event(engine: Engine, stream: bool) -> Reply:
    """The first event's JSON spread over 100 whitespace `data:` lines: valid SSE and JSON, but over the limit."""
    first, *rest = engine.stream()
    head = first.rstrip(b"\r\n")
    padded = head[:-1] + b"\n" + (b"data: " + b" " * 1000 + b"\n") * 100 + b"data: }\n\n"
    return _reply(engine, stream, [padded, *rest])


def _drip(engine: Engine, stream: bool) -> Reply:
    data = b"".join(_body(engine, stream))
    size = len(data) // 20 + 1
    return _reply(engine, stream, [data[i:i + size] for i in range(0, len(data), size)], chunk_delay=0.02)


HTML = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>nginx</h1></body></html>"
HUGE_LINE_LIMIT = 64 * 1024

COMMON: tuple[tuple[str, Callable[[Engine, bool], Reply], Outcome], ...] = (
    ("reset before headers", lambda e, s: Reply(reset_before_headers=True), "failover"),
    ("reset inside the first event or body", lambda e, s: _reply(e, s, _halves(e, s), reset_after=1), "failover"),
    ("stall before headers", lambda e, s: Reply(delay=30), "failover"),
    ("stall inside the first event or body", lambda e, s: _reply(e, s, _halves(e, s), stall_after=1), "failover"),
    ("slow drip", _drip, "served"),
    ("a 200 with an HTML page", lambda e, s: Reply(body=HTML, content_type="text/html"), "failover"),
)
NON_STREAM: tuple[tuple[str, Callable[[Engine, bool], Reply], Outcome], ...] = (
    ("invalid JSON", lambda e, s: Reply(body=e.good()[:-7]), "failover"),
    ("JSON of another shape", lambda e, s: Reply(json=[{"unexpected": True}]), "failover"),
    ("an empty body", lambda e, s: Reply(body=b""), "failover"),
    ("a body over the size limit", lambda e, s: Reply(json=completion("x" * 2 * HUGE_LINE_LIMIT)), "failover"),
)
STREAM: tuple[tuple[str, Callable[[Engine, bool], Reply], Outcome], ...] = (
    ("stall after the headers", lambda e, s: _reply(e, s, e.stream(), stall_after=0), "failover"),
    ("reset mid-stream", lambda e, s: _reply(e, s, e.stream(), reset_after=len(e.stream()) - 2), "interrupted"),
    ("stall between chunks", lambda e, s: _reply(e, s, e.stream(), stall_after=len(e.stream()) - 2), "interrupted"),
    ("an invalid JSON event", lambda e, s: _reply(e, s, [b"data: {\"choices\": [\n\n", *e.stream()]), "failover"),
    ("a truncated event at the end", lambda e, s: _reply(e, s, [e.stream()[0][:-9]]), "failover"),
    ("an event too large", lambda e, s: _reply(e, s, [b":" + b"x" * 2 * HUGE_LINE_LIMIT + b"\n\n", *e.stream()]),
     "failover"),
    ("an event over the limit in many data lines", _padded_first_event, "failover"),
    ("an empty stream", lambda e, s: _reply(e, s, []), "failover"),
)


def _garbage_outcome(engine: Engine) -> Outcome:
    # SSE: a line without a known field is ignored by the specification. AWS: the frame's CRC fails.
    return "served" if engine.stream_type == "text/event-stream" else "failover"


def _no_terminal_outcome(engine: Engine) -> Outcome:
    return "interrupted" if engine.needs_terminal else "served"


PER_ENGINE: tuple[tuple[str, Callable[[Engine, bool], Reply], Callable[[Engine], Outcome]], ...] = (
    ("a garbage line", lambda e, s: _reply(e, s, [b"garbage without a colon \xff\n", *e.stream()]), _garbage_outcome),
    ("no terminal event or [DONE]", lambda e, s: _reply(e, s, e.stream()[:-1]), _no_terminal_outcome),
)

CASES = [pytest.param(e, False, f, o, id=f"{e.name}-json-{n}") for e in ENGINES for n, f, o in COMMON + NON_STREAM]
CASES += [pytest.param(e, True, f, o, id=f"{e.name}-stream-{n}") for e in ENGINES for n, f, o in COMMON + STREAM]
CASES += [pytest.param(e, True, f, o(e), id=f"{e.name}-stream-{n}") for e in ENGINES for n, f, o in PER_ENGINE]


# --- Reading answers ---


def sse_events(text: str) -> list[Any]:
    events: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            events.append(block[6:] if block[6:] == "[DONE]" else json.loads(block[6:]))
    return events


def streamed_text(events: list[Any]) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in events
                   if isinstance(c, dict) and c.get("choices"))


def ask(rig: Rig, stream: bool, model: str = "m") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with httpx.Client(base_url=rig.gateway.url, timeout=15) as http:
        return http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-client"})


def answer_text(response: httpx.Response, stream: bool) -> str:
    if not stream:
        return str(response.json()["choices"][0]["message"]["content"])
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and any(c["choices"][0]["finish_reason"] for c in events[:-1] if c["choices"])
    return streamed_text(events)


def good_reply(engine: Engine, stream: bool) -> Reply:
    if stream:
        return _reply(engine, True, engine.stream())
    return Reply(body=engine.good())


def assert_interrupted(response: httpx.Response, expected: str) -> None:
    """Started, then cut: what arrived is a prefix of the answer, then an error chunk in the envelope, then [DONE]."""
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "upstream_error" and error["code"] == "stream_interrupted" and error["message"]
    text = streamed_text(events[:-2])
    assert text and expected.startswith(text)


# --- Tests ---


@pytest.mark.parametrize(("engine", "stream", "fault", "outcome"), CASES)
def test_upstream_fault_fails_over_or_ends_cleanly(rigs: Callable[[Engine], Rig], monkeypatch: pytest.MonkeyPatch,
                                                  engine: Engine, stream: bool, fault: Callable[[Engine, bool], Reply],
                                                  outcome: Outcome) -> None:
    monkeypatch.setattr(uni_api, "UPSTREAM_BODY_LIMIT", HUGE_LINE_LIMIT)
    monkeypatch.setattr(adapters, "SSE_LINE_LIMIT", HUGE_LINE_LIMIT)
    rig = rigs(engine)
    rig.faulty.enqueue(fault(engine, stream))
    if outcome == "failover":
        rig.healthy.enqueue(good_reply(engine, stream))
    started = time.monotonic()
    response = ask(rig, stream)
    assert time.monotonic() - started < 5 * TIMEOUT + 2
    assert len(rig.faulty.received) == 1
    expected = engine.stream_text if stream else engine.text
    if outcome == "interrupted":
        assert_interrupted(response, expected)
    else:
        assert response.status_code == 200, response.text
        assert answer_text(response, stream) == expected
    assert len(rig.healthy.received) == (1 if outcome == "failover" else 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("engine", ENGINES, ids=[e.name for e in ENGINES])
def test_every_engine_answers_with_one_created_time_its_own_or_the_gateways(rigs: Callable[[Engine], Rig],
                                                                            engine: Engine, stream: bool) -> None:
    """OpenAI upstreams keep their `created`; formats without a timestamp get the request's time, the same
    on every chunk of a stream (uni_api._stamp, the one place that reads the clock for it)."""
    rig = rigs(engine)
    rig.faulty.enqueue(good_reply(engine, stream))
    before = int(time.time())
    response = ask(rig, stream)
    after = time.time()
    assert response.status_code == 200, response.text
    events = sse_events(response.text)[:-1] if stream else [response.json()]
    stamps = {event["created"] for event in events}
    assert len(stamps) == 1
    if engine.name == "gpt":
        assert stamps == {1700000000}
    else:
        assert before <= stamps.pop() <= after


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("engine", ENGINES, ids=[e.name for e in ENGINES])
def test_connection_refused_fails_over_to_the_next_channel(rigs: Callable[[Engine], Rig], engine: Engine,
                                                           stream: bool) -> None:
    rig = rigs(engine)
    rig.healthy.enqueue(good_reply(engine, stream))
    response = ask(rig, stream, model="r")
    assert response.status_code == 200
    assert answer_text(response, stream) == (engine.stream_text if stream else engine.text)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("engine", ENGINES, ids=[e.name for e in ENGINES])
def test_every_channel_failing_gives_one_envelope_naming_each_attempt(rigs: Callable[[Engine], Rig], engine: Engine,
                                                                      stream: bool) -> None:
    rig = rigs(engine)
    rig.faulty.enqueue(Reply(body=HTML, content_type="text/html"))
    rig.healthy.enqueue(Reply(reset_before_headers=True))
    response = ask(rig, stream)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "all_channels_failed" and error["type"] == "upstream_error"
    assert f"faulty/{engine.upstream_model}: " in error["message"]
    assert f"healthy/{engine.upstream_model}: " in error["message"]
    assert "Traceback" not in response.text


def test_an_endless_drip_is_cut_by_the_request_time_limit(upstream: FakeUpstream, make_gateway: Any) -> None:
    """Bytes that keep coming reset the read timeout, so only the whole-request cap can end the wait."""
    config = engine_config(ENGINES[0], upstream.url, upstream.url, upstream.url)
    config["preferences"] = {"model_timeout": 5, "request_timeout": 1}
    gateway = make_gateway(config)
    upstream.enqueue(Reply(raw_chunks=[b" "] * 10_000, chunk_delay=0.05, content_type="application/json"))
    started = time.monotonic()
    with gateway.http("sk-client") as http:
        response = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": ""}]})
    assert time.monotonic() - started < 3
    assert response.status_code == 504 and "time limit" in response.json()["error"]["message"]
    assert upstream.wait_cancelled()  # the gateway hung up on the dripping upstream
