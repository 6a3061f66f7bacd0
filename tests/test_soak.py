"""Soak: 20,000 mixed stream and non-stream requests at concurrency 64 over three channels with 1% injected
upstream faults, against the gateway as a subprocess. Nothing is lost or crossed (each answer carries its own
request's marker), and after warm-up the process's RSS, descriptors and connections do not grow."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import FakeUpstream, Reply, ServerLoop, simple_config
from gateway_process import GatewayProcess, gateway_process

TOTAL = 20_000
WARM_UP = 2_000
CONCURRENCY = 64
FAULTS = (Reply(reset_before_headers=True), Reply(status=503, json={"error": {"message": "overloaded"}}),
          Reply(body=b"<html>bad gateway</html>", content_type="text/html"))


class FaultyUpstream(FakeUpstream):
    """The echoing fake upstream, failing one request in a hundred before it answered anything."""

    def __init__(self, server_loop: ServerLoop) -> None:
        super().__init__(server_loop)
        self.count = itertools.count(1)
        self.faults = 0

    def default_reply(self, path: str, body: bytes) -> Reply:
        self.received.clear()  # keep the test process small: only the count matters here
        if next(self.count) % 100 == 0:
            self.faults += 1
            return FAULTS[self.faults % len(FAULTS)]
        return super().default_reply(path, body)


async def one_request(session: aiohttp.ClientSession, url: str, index: int) -> str | None:
    """Send request `index`; None when the answer is its own, else what went wrong."""
    marker = f"marker-{index}-{uuid.uuid4().hex}"
    stream = index % 2 == 0
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": marker}], "stream": stream}
    async with session.post(url, json=body) as response:
        raw = await response.read()
    if response.status != 200:
        return f"{index}: HTTP {response.status} {raw[:200]!r}"
    if stream:
        events = [json.loads(block[6:]) for block in raw.decode().split("\n\n") if block.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        complete = raw.endswith(b"data: [DONE]\n\n")
    else:
        text, complete = json.loads(raw)["choices"][0]["message"]["content"], True
    return None if complete and text == f"echo: {marker}" else f"{index}: wrong answer {text!r}"


async def run_load(url: str, indexes: range) -> list[str]:
    pending = iter(indexes)
    problems: list[str] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    headers = {"Authorization": "Bearer sk-client"}
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def worker() -> None:
            for index in pending:
                problem = await one_request(session, f"{url}/v1/chat/completions", index)
                if problem:
                    problems.append(problem)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return problems


def settled(gateway: GatewayProcess) -> tuple[int, int, int]:
    """RSS, open descriptors and open sockets once the gateway is idle again."""
    time.sleep(0.5)
    fds = gateway.open_fds()
    return gateway.rss_bytes(), len(fds), sum(target.startswith("socket:") for target in fds)


@pytest.mark.soak
def test_soak_loses_and_crosses_nothing_and_does_not_grow(server_loop: ServerLoop, tmp_path: Path,
                                                         record_property: Any) -> None:
    upstreams = [FaultyUpstream(server_loop) for _ in range(3)]
    for upstream in upstreams:
        server_loop.run(upstream.start())
    try:
        config = simple_config(*upstreams, SCHEDULING_ALGORITHM="round_robin")
        with gateway_process(config, tmp_path) as gateway:
            started = time.monotonic()
            assert asyncio.run(run_load(gateway.url, range(WARM_UP))) == []
            gc.collect()
            rss_warm, fds_warm, sockets_warm = settled(gateway)
            problems = asyncio.run(run_load(gateway.url, range(WARM_UP, TOTAL)))
            rss_end, fds_end, sockets_end = settled(gateway)
            elapsed = time.monotonic() - started
            assert problems == []
            assert sum(u.faults for u in upstreams) >= TOTAL // 100 - 10  # the faults really happened
            assert rss_end - rss_warm < 10 * 1024 * 1024, (rss_warm, rss_end)
            assert fds_end <= fds_warm and sockets_end <= sockets_warm, (fds_warm, fds_end)
            record_property("soak", f"{TOTAL} requests in {elapsed:.1f} s; RSS {rss_warm / 2**20:.1f} -> "
                            f"{rss_end / 2**20:.1f} MiB; fds {fds_warm} -> {fds_end}; sockets {sockets_warm} -> "
                            f"{sockets_end}")
    finally:
        for upstream in upstreams:
            server_loop.run(upstream.stop())


def gateway_tasks(server_loop: ServerLoop) -> int:
    """Tasks on the shared loop, less the fake upstreams' per-connection handlers: how many idle keep-alive
    connections the gateway's pool holds to them varies from run to run and is not a leak."""
    return sum(1 for task in asyncio.all_tasks(server_loop.loop)
               if "RequestHandler.start" not in getattr(task.get_coro(), "__qualname__", ""))


def test_no_asyncio_tasks_or_upstream_connections_outlive_their_requests(server_loop: ServerLoop,
                                                                        make_gateway: Any) -> None:
    """In process, where the loop's tasks can be counted: 600 requests, some cut off by their client."""
    upstreams = [FaultyUpstream(server_loop) for _ in range(2)]
    for upstream in upstreams:
        server_loop.run(upstream.start())
    try:
        gateway = make_gateway(simple_config(*upstreams))
        asyncio.run(run_load(gateway.url, range(64)))
        baseline = gateway_tasks(server_loop)

        async def with_disconnects() -> list[str]:
            for _ in range(40):  # slow answers the clients give up on: the gateway must cancel each call
                upstreams[0].enqueue(Reply(json={"never": "read"}, delay=5))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5),
                                             headers={"Authorization": "Bearer sk-client"}) as session:
                cut = await asyncio.gather(*(one_request(session, f"{gateway.url}/v1/chat/completions", index)
                                             for index in range(40)), return_exceptions=True)
            assert all(isinstance(outcome, asyncio.TimeoutError) for outcome in cut), cut
            return await run_load(gateway.url, range(500))

        assert asyncio.run(with_disconnects()) == []
        assert upstreams[0].wait_cancelled(40)
        deadline = time.monotonic() + 5
        while gateway_tasks(server_loop) > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway_tasks(server_loop) <= baseline
    finally:
        for upstream in upstreams:
            server_loop.run(upstream.stop())
