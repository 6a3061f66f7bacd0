"""Shared fixtures: a background event loop serving fake upstreams and real gateways on 127.0.0.1.

The fake upstream is an aiohttp.web app with a scripted queue of replies (after llm's MockModel.enqueue)
that records every request it received. The gateway is the real app under uvicorn on a free port.
Both run on one background loop, so tests can use blocking clients (the openai SDK) and async ones alike.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pytest
import uvicorn
from aiohttp import web
from hypothesis import settings
from ruamel.yaml import YAML

import uni_api

T = TypeVar("T")

# Hypothesis draws the same examples on every run, so a run of the suite is reproducible (CI included).
settings.register_profile("uni-api", derandomize=True, database=None)
settings.load_profile("uni-api")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ServerLoop:
    """An asyncio loop in a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="session")
def server_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.loop.call_soon_threadsafe(loop.loop.stop)


class FakeClock:
    """A clock for Scheduler(clock=...): time moves only when a test advances it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- Recorded fixtures, byte streams and credentials ---

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(folder: str, name: str) -> Any:
    """A recorded JSON fixture, tests/fixtures/<folder>/<name>."""
    return json.loads((FIXTURES / folder / name).read_text())


def load_fixture_lines(folder: str, name: str) -> list[Any]:
    """A JSON Lines fixture (expected stream chunks): one value per non-empty line."""
    return [json.loads(line) for line in (FIXTURES / folder / name).read_text().splitlines() if line]


async def byte_pieces(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    """`data` in small pieces, as network reads split events anywhere."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def sse_pieces(data: bytes) -> list[bytes]:
    """One SSE event per piece of a recording (LF or CRLF framed), for a fake upstream's raw_chunks."""
    return [part + b"\n\n" for part in re.split(rb"\r?\n\r?\n", data) if part.strip()]


def fixture_sse(folder: str, name: str) -> list[bytes]:
    """A recorded SSE fixture as one piece per event."""
    return sse_pieces((FIXTURES / folder / name).read_bytes())


def rsa_pem(bits: int = 1024) -> str:
    """A fresh RSA private key in PKCS#8 PEM, as a service-account JSON holds it; skips without cryptography."""
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem: str = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()
    return pem


# --- Per-engine provider entries for api.yaml, every request going to one fake upstream ---


def bedrock_provider(url: str, model: str, alias: str, name: str = "br") -> dict[str, Any]:
    """An aws (Bedrock) provider: SigV4 with AWS's documentation example key, region us-west-2."""
    return {"provider": name, "base_url": url, "engine": "aws", "aws_access_key": "AKIDEXAMPLE",
            "aws_secret_key": "secret", "region": "us-west-2", "model": [{model: alias}]}


def vertex_claude_provider(url: str, pem: str, model: str, alias: str, name: str = "vx") -> dict[str, Any]:
    """A vertex-claude provider of project p in us-east5 whose token exchange goes to the same upstream."""
    return {"provider": name, "base_url": url, "engine": "vertex-claude", "project_id": "p", "region": "us-east5",
            "client_email": "gw@p.iam.gserviceaccount.com", "private_key": pem, "token_uri": f"{url}/token",
            "model": [{model: alias}]}


# --- Fake upstream ---


@dataclass
class Reply:
    """One scripted answer. `sse` items are dicts (sent as JSON) or raw strings (sent verbatim as data)."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    sse: list[Any] | None = None
    raw_chunks: list[bytes] | None = None  # written verbatim, for framing tests
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the status line
    chunk_delay: float = 0.0
    stall_after: int | None = None  # stop sending (but keep the connection) after N chunks
    reset_after: int | None = None  # drop the connection after N chunks
    reset_before_headers: bool = False  # drop the connection before sending a status line
    content_type: str | None = None


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def completion(content: str, model: str = "up-model", **extra: Any) -> dict[str, Any]:
    """An OpenAI chat.completion as the API reference shows it."""
    return {
        "id": "chatcmpl-up1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        **extra,
    }


def chunks(parts: list[str], model: str = "up-model", usage: bool = False) -> list[Any]:
    """OpenAI chat.completion.chunk events for `parts`, a finish chunk, optionally usage, then [DONE]."""
    base = {"id": "chatcmpl-up1", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    events: list[Any] = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": p}, "logprobs": None,
                                     "finish_reason": None}]} for p in parts]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    if usage:
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(parts),
                                                          "total_tokens": 5 + len(parts)}})
    events.append("[DONE]")
    return events


class FakeUpstream:
    def __init__(self, server_loop: ServerLoop) -> None:
        self.server_loop = server_loop
        self.queue: deque[Reply] = deque()
        self.received: list[Received] = []
        self.cancelled = 0  # requests whose client (the gateway) went away mid-answer
        self.models = ["up-model"]
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def enqueue(self, reply: Reply | None = None, **kwargs: Any) -> None:
        self.queue.append(reply or Reply(**kwargs))

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    def wait_cancelled(self, count: int = 1, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cancelled >= count:
                return True
            time.sleep(0.02)
        return False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path, dict(request.query), dict(request.headers),
                                      body))
        reply = self.queue.popleft() if self.queue else self.default_reply(request.path, body)
        try:
            return await self.answer(request, reply)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def default_reply(self, path: str, body: bytes) -> Reply:
        data = json.loads(body) if body.startswith(b"{") else {}
        model = data.get("model", "up-model")
        if path.endswith("/models"):
            return Reply(json={"object": "list", "data": [
                {"id": m, "object": "model", "created": 1, "owned_by": "up"} for m in self.models]})
        if path.endswith("/embeddings"):
            return Reply(json={"object": "list", "model": model, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1}})
        messages = data.get("messages") or [{"content": ""}]
        text = f"echo: {messages[-1].get('content')}"
        if data.get("stream"):
            return Reply(sse=chunks([text[: len(text) // 2], text[len(text) // 2:]], model))
        return Reply(json=completion(text, model))

    async def answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.reset_before_headers:
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)  # cancelled at once: the connection is gone
        if reply.sse is None and reply.raw_chunks is None:
            body = reply.body if reply.body is not None else json.dumps(reply.json).encode()
            return web.Response(status=reply.status, body=body, headers=reply.headers,
                                content_type=reply.content_type or "application/json")
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.content_type = reply.content_type or "text/event-stream"
        await response.prepare(request)
        pieces = reply.raw_chunks or [
            b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n"
            for e in reply.sse or []
        ]
        for i, piece in enumerate(pieces):
            if reply.stall_after is not None and i >= reply.stall_after:
                await asyncio.sleep(3600)
            if reply.reset_after is not None and i >= reply.reset_after:
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(piece)
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
        await response.write_eof()
        return response


@pytest.fixture
def upstream(server_loop: ServerLoop) -> Iterator[FakeUpstream]:
    fake = FakeUpstream(server_loop)
    server_loop.run(fake.start())
    yield fake
    server_loop.run(fake.stop())


@pytest.fixture
def make_upstream(server_loop: ServerLoop) -> Iterator[Callable[[], FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make() -> FakeUpstream:
        fake = FakeUpstream(server_loop)
        server_loop.run(fake.start())
        started.append(fake)
        return fake

    yield make
    for fake in started:
        server_loop.run(fake.stop())


# --- Gateway ---


def to_yaml(config: dict[str, Any]) -> str:
    import io

    stream = io.StringIO()
    YAML().dump(config, stream)
    return stream.getvalue()


class GatewayServer:
    """The real app under uvicorn on a free loopback port."""

    def __init__(self, server_loop: ServerLoop, config: uni_api.Config, **app_kwargs: Any) -> None:
        self.server_loop = server_loop
        self.port = free_port()
        self.app = uni_api.create_app(config, **app_kwargs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", loop="asyncio"))
        self.task: asyncio.Future[Any] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> uni_api.Gateway:
        return self.app.state.gateway  # type: ignore[no-any-return]

    def start(self) -> None:
        async def serve() -> None:
            self.task = asyncio.ensure_future(self.server.serve())

        self.server_loop.run(serve())
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self.task and self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            async def wait() -> None:
                assert self.task is not None
                await asyncio.wait_for(self.task, 10)

            self.server_loop.run(wait())

    def client(self, key: str, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)

    def anthropic(self, key: str | None = "sk-client", **kwargs: Any) -> anthropic.Anthropic:
        """The official anthropic SDK on /v1/messages (the key goes as x-api-key, or pass auth_token=...)."""
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, **kwargs)

    def async_client(self, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def make_gateway(server_loop: ServerLoop) -> Iterator[Callable[..., GatewayServer]]:
    """make_gateway(config_dict_or_yaml, **create_app_kwargs) -> a started GatewayServer."""
    started: list[GatewayServer] = []

    def make(config: dict[str, Any] | str, **kwargs: Any) -> GatewayServer:
        text = config if isinstance(config, str) else to_yaml(config)
        server = GatewayServer(server_loop, uni_api.parse_config(text, "api.yaml"), **kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# A fake upstream as each engine's provider: (name prefix, base_url path below the upstream's root, key prefix).
ENGINE_ENTRIES: dict[str, tuple[str, str, str]] = {
    "claude": ("c", "/v1/messages", "sk-ant-secret"),
    "cloudflare": ("cf", "", "cf-secret"),
    "cohere": ("co", "/v2/chat", "co-secret"),
    "gemini": ("gem", "/v1beta", "AIza-gemini-secret"),
}


def engine_config(engine: str, *upstreams: FakeUpstream, models: list[Any] | None = None,
                  **fields: Any) -> dict[str, Any]:
    """One `engine` provider per upstream (named <prefix>0, <prefix>1, ... with key <key prefix>-<i>), cooldown
    off, `fields` added to each; one client key sk-client for all."""
    prefix, path, secret = ENGINE_ENTRIES[engine]
    providers = [{"provider": f"{prefix}{i}", "engine": engine, "base_url": u.url + path, "api": f"{secret}-{i}",
                  "preferences": {"cooldown_period": 0}, **fields, **({"model": models} if models is not None else {})}
                 for i, u in enumerate(upstreams)]
    return {"providers": providers, "api_keys": [{"api": "sk-client"}]}


def simple_config(*upstreams: FakeUpstream, models: list[Any] | None = None, **key_prefs: Any) -> dict[str, Any]:
    """One provider per upstream (named up0, up1, ...) serving `models`, one client key sk-client for all."""
    providers = [{"provider": f"up{i}", "base_url": f"{u.url}/v1/chat/completions", "api": f"sk-up{i}-secret",
                  "model": list(models or ["gpt-4o"]), "preferences": {"cooldown_period": 0}}
                 for i, u in enumerate(upstreams)]
    key: dict[str, Any] = {"api": "sk-client", "model": ["all"]}
    if key_prefs:
        key["preferences"] = key_prefs
    return {"providers": providers, "api_keys": [key]}


@pytest.fixture
def redis_server(tmp_path: Any) -> Iterator[Any]:
    """A started redis-server (tests/redis_server.py), killed afterwards; skips saying why when none is installed."""
    from redis_server import BINARY, RedisServer

    if BINARY is None:
        pytest.skip("redis-server (or valkey-server) is not installed; .ci/run installs Debian's redis-server")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
