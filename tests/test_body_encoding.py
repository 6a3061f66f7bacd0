"""Compressed request bodies (Content-Encoding: zstd, gzip, deflate) on every POST route, decoded under the body
limit: RFC 9110 section 8.4 (content codings; "deflate" is the zlib format), RFC 8878 (zstd). Codex CLI sends its
requests zstd-compressed. A decompression bomb gets 413 without decoding past the limit; an unknown coding 415.
"""

from __future__ import annotations

import gzip
import json
import resource
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import zstandard
from conftest import FakeUpstream, GatewayServer, simple_config

import uni_api

MakeGateway = Callable[..., GatewayServer]
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "compressed hello " * 50}]}
GIB = 1 << 30

ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,  # the zlib format, as RFC 9110 names "deflate"
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def gzip_bomb() -> bytes:
    """1 GiB of zeros as a valid 1 MB gzip file: one MiB compressed with a full flush (no history across it)
    repeated, then the final empty block and the trailer's CRC and size."""
    zeros = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    piece = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(zeros, crc)
    return head + piece * 1023 + b"\x03\x00" + struct.pack("<II", crc, GIB & 0xFFFFFFFF)


def zstd_bomb() -> bytes:
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    return b"".join([*(compressor.compress(zeros) for _ in range(1024)), compressor.flush()])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"gzip": gzip_bomb(), "zstd": zstd_bomb()}


@pytest.fixture
def gateway(upstream: FakeUpstream, make_gateway: MakeGateway) -> GatewayServer:
    return make_gateway(simple_config(upstream, models=["gpt-4o", "text-embedding-3-small"]))


def post(gateway: GatewayServer, path: str, data: bytes, encoding: str, **headers: str) -> httpx.Response:
    headers = {"Authorization": "Bearer sk-client", "Content-Type": "application/json",
               "Content-Encoding": encoding, **headers}
    return httpx.post(gateway.url + path, content=data, headers=headers, timeout=60)


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_compressed_chat_request_is_decoded(gateway: GatewayServer, upstream: FakeUpstream, encoding: str) -> None:
    response = post(gateway, "/v1/chat/completions", ENCODERS[encoding](json.dumps(BODY).encode()), encoding)
    assert response.status_code == 200, response.text
    assert upstream.received[-1].json["messages"] == BODY["messages"]
    assert response.json()["choices"][0]["message"]["content"].startswith("echo: compressed hello")


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
    ("/v1/messages", {"model": "gpt-4o", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "store": False}),  # as Codex sends it to ChatGPT's backend
])
def test_every_post_route_decodes_zstd(gateway: GatewayServer, upstream: FakeUpstream, path: str,
                                       body: dict[str, Any]) -> None:
    response = post(gateway, path, ENCODERS["zstd"](json.dumps(body).encode()), "zstd")
    assert response.status_code == 200, response.text
    assert upstream.received[-1].path.endswith(("/embeddings", "/chat/completions"))


def test_coding_names_are_case_insensitive(gateway: GatewayServer) -> None:
    assert post(gateway, "/v1/chat/completions", gzip.compress(json.dumps(BODY).encode()), "GZip").status_code == 200


def test_identity_coding_is_the_body_as_sent(gateway: GatewayServer) -> None:
    assert post(gateway, "/v1/chat/completions", json.dumps(BODY).encode(), "identity").status_code == 200


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_decompression_bomb_gets_413_quickly_without_memory_growth(
        gateway: GatewayServer, upstream: FakeUpstream, bombs: dict[str, bytes], encoding: str) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.monotonic()
    response = post(gateway, "/v1/chat/completions", bombs[encoding], encoding)
    elapsed = time.monotonic() - started
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large" and "decoded" in response.json()["error"]["message"]
    assert elapsed < 3, f"{elapsed:.1f} s: the bomb was decoded past the limit"  # all of it takes ~10 s
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 200, f"peak memory grew by {grown_mib:.0f} MiB"
    assert upstream.received == []


def test_decoded_size_over_a_small_limit_gets_413(upstream: FakeUpstream, make_gateway: MakeGateway) -> None:
    config = {**simple_config(upstream), "preferences": {"max_body_size": "1KiB"}}
    gateway = make_gateway(config)
    small = gzip.compress(json.dumps({**BODY, "messages": [{"role": "user", "content": "x" * 2000}]}).encode())
    assert len(small) < 1024
    assert post(gateway, "/v1/chat/completions", small, "gzip").status_code == 413


@pytest.mark.parametrize("encoding", ["br", "compress", "gzip, zstd", "x-unknown"])
def test_unknown_or_stacked_codings_get_415_in_the_openai_envelope(gateway: GatewayServer, encoding: str) -> None:
    response = post(gateway, "/v1/chat/completions", b"{}", encoding)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_content_encoding"
    assert "zstd, gzip, deflate" in error["message"]


def test_zstd_without_a_decoder_gets_415_naming_the_fix(gateway: GatewayServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uni_api, "_zstandard", None)
    monkeypatch.setattr(uni_api, "_stdlib_zstd", None)
    response = post(gateway, "/v1/chat/completions", ENCODERS["zstd"](json.dumps(BODY).encode()), "zstd")
    assert response.status_code == 415
    assert "pip install zstandard" in response.json()["error"]["message"]


@pytest.mark.parametrize(("encoding", "data"), [
    ("gzip", b"\x1f\x8b\x08\x00garbage garbage garbage"),
    ("gzip", gzip.compress(json.dumps(BODY).encode())[:-12]),  # truncated
    ("deflate", b"not zlib data at all"),
    ("zstd", b"\x28\xb5\x2f\xfd garbage"),
    ("zstd", b"plain text, not a zstd frame"),
])
def test_corrupt_compressed_body_gets_400(gateway: GatewayServer, upstream: FakeUpstream, encoding: str,
                                          data: bytes) -> None:
    response = post(gateway, "/v1/chat/completions", data, encoding)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert upstream.received == []


def test_messages_route_answers_415_in_its_own_error_shape(gateway: GatewayServer) -> None:
    response = post(gateway, "/v1/messages", b"{}", "br", **{"anthropic-version": "2023-06-01"})
    assert response.status_code == 415
    assert response.json()["type"] == "error" and "br" in response.json()["error"]["message"]
