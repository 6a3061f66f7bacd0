"""Client faults: a client that leaves frees its upstream call at once, a client that never reads does not make
the gateway buffer the upstream without bound, and a client trickling its headers is cut off."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import FakeUpstream, Reply, chunks, simple_config
from gateway_process import gateway_process

USER = [{"role": "user", "content": "hi"}]


def raw_request(port: int, body: dict[str, Any]) -> socket.socket:
    """A raw socket that sent one chat request and reads nothing yet."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_client_leaving_mid_stream_closes_the_upstream_call_within_a_second(upstream: FakeUpstream,
                                                                            make_gateway: Any) -> None:
    upstream.enqueue(Reply(sse=chunks(["a", "b", "c"]), stall_after=2))
    gateway = make_gateway(simple_config(upstream))
    sock = raw_request(gateway.port, {"model": "gpt-4o", "messages": USER, "stream": True})
    received = b""
    while b"data: " not in received:  # the stream started
        received += sock.recv(65536)
    sock.close()
    assert upstream.wait_cancelled(timeout=1.0)


def test_client_leaving_before_a_non_stream_answer_closes_the_upstream_call_within_a_second(
        upstream: FakeUpstream, make_gateway: Any) -> None:
    upstream.enqueue(Reply(json={"never": "sent"}, delay=30))
    gateway = make_gateway(simple_config(upstream))
    sock = raw_request(gateway.port, {"model": "gpt-4o", "messages": USER})
    deadline = time.monotonic() + 5
    while not upstream.received and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()
    assert upstream.wait_cancelled(timeout=1.0)


class CountingPieces(list):  # type: ignore[type-arg]
    """An endless stream's pieces, counting how many the fake upstream managed to hand to its socket."""

    def __init__(self, first: bytes, piece: bytes, count: int) -> None:
        super().__init__([first])
        self.first, self.piece, self.count, self.written = first, piece, count, 0

    def __iter__(self) -> Any:
        yield self.first
        for _ in range(self.count):
            self.written += len(self.piece)
            yield self.piece


def test_a_client_that_never_reads_makes_the_gateway_stop_reading_the_upstream(upstream: FakeUpstream,
                                                                               make_gateway: Any) -> None:
    first = b"data: " + json.dumps(chunks(["start"])[0]).encode() + b"\n\n"
    event = b"data: " + json.dumps(chunks(["x" * 1000])[1]).encode() + b"\n\n"
    pieces = CountingPieces(first, event, 200_000)  # about 220 MB if nobody pushed back
    upstream.enqueue(Reply(raw_chunks=pieces))
    gateway = make_gateway(simple_config(upstream))
    sock = raw_request(gateway.port, {"model": "gpt-4o", "messages": USER, "stream": True})
    try:
        samples = []
        for _ in range(3):
            time.sleep(1.0)
            samples.append(pieces.written)
        assert samples[-1] < 16 * 1024 * 1024  # socket buffers and the gateway's read buffer, nothing more
        assert samples[-1] - samples[-2] < 256 * 1024  # and it stopped: back-pressure, not slow buffering
    finally:
        sock.close()
    assert upstream.wait_cancelled(timeout=2.0)


def test_headers_trickled_one_byte_a_second_are_cut_off_while_others_are_served(upstream: FakeUpstream,
                                                                                  tmp_path: Path) -> None:
    with gateway_process(simple_config(upstream), tmp_path, HEADER_TIMEOUT="1.5") as gateway:
        slow = socket.create_connection(("127.0.0.1", gateway.port))
        idle = socket.create_connection(("127.0.0.1", gateway.port))
        slow.settimeout(0.05)
        started, closed_after = time.monotonic(), None
        with httpx.Client(base_url=gateway.url, timeout=5) as client:
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 20:
                try:
                    slow.sendall(bytes([byte]))
                    if slow.recv(1) == b"":
                        closed_after = time.monotonic() - started
                        break
                except TimeoutError:
                    pass
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                assert client.get("/healthz").status_code == 200  # served meanwhile
                time.sleep(1.0)  # one byte a second
        assert closed_after is not None and closed_after < 3.0
        idle.settimeout(1.0)
        assert idle.recv(1) == b""  # a connection that never sent a byte is closed too
        slow.close()
        idle.close()


def _post_head(length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n")


def test_a_body_that_stops_half_way_is_cut_off_while_a_slow_steady_one_is_served(upstream: FakeUpstream,
                                                                                   tmp_path: Path) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": USER}).encode()
    with gateway_process(simple_config(upstream), tmp_path, HEADER_TIMEOUT="1.0") as gateway:
        stalled = socket.create_connection(("127.0.0.1", gateway.port))
        stalled.sendall(_post_head(len(body)) + body[:10])
        steady = socket.create_connection(("127.0.0.1", gateway.port))
        steady.sendall(_post_head(len(body)))
        started = time.monotonic()
        for i in range(0, len(body), len(body) // 4 + 1):  # a piece every 0.6 s: 2.4 s in all, never a 1 s pause
            time.sleep(0.6)
            steady.sendall(body[i:i + len(body) // 4 + 1])
        steady.settimeout(5)
        answer = steady.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        stalled.settimeout(max(0.1, 3.0 - (time.monotonic() - started)))
        assert stalled.recv(65536) == b""  # closed within two timeouts of its last byte, without an answer
        assert len(upstream.received) == 1  # only the whole body reached the upstream
        steady.close()
        stalled.close()
