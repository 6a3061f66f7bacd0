"""The one SSE framer (adapters.iter_sse), per the WHATWG "Server-sent events" parsing rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from adapters import SSEEvent, iter_sse, sse_frame


def frame(pieces: list[bytes]) -> list[SSEEvent]:
    async def source() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def collect() -> list[SSEEvent]:
        return [event async for event in iter_sse(source())]

    return asyncio.run(collect())


STREAM = "event: message_start\ndata: {\"a\": \"ü€\"}\n\n: ping\n\ndata: line1\ndata: line2\n\ndata:nospace\n\n"
EXPECTED = [SSEEvent("message_start", '{"a": "ü€"}'), SSEEvent("message", "line1\nline2"),
            SSEEvent("message", "nospace")]


def test_whole_stream_is_framed_into_events() -> None:
    assert frame([STREAM.encode()]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_events_split_across_reads_at_any_byte_are_reassembled(size: int) -> None:
    raw = STREAM.encode()
    assert frame([raw[i:i + size] for i in range(0, len(raw), size)]) == EXPECTED


def test_crlf_line_endings_are_accepted() -> None:
    assert frame([STREAM.replace("\n", "\r\n").encode()]) == EXPECTED


def test_comments_and_unknown_fields_are_ignored() -> None:
    assert frame([b": keep-alive\nid: 7\nretry: 100\ndata: x\n\n"]) == [SSEEvent("message", "x")]


def test_only_one_leading_space_is_removed_from_a_value() -> None:
    assert frame([b"data:  two spaces\n\ndata: d: a t a\n\n"]) == [SSEEvent("message", " two spaces"),
                                                                   SSEEvent("message", "d: a t a")]


def test_event_name_resets_after_each_event() -> None:
    assert frame([b"event: ping\ndata: 1\n\ndata: 2\n\n"]) == [SSEEvent("ping", "1"), SSEEvent("message", "2")]


def test_event_without_closing_blank_line_at_eof_is_dropped() -> None:
    assert frame([b"data: complete\n\ndata: trunc"]) == [SSEEvent("message", "complete")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert frame([b"\n\n\nevent: x\n\n"]) == []


def test_sse_frame_is_one_data_line_and_blank_line() -> None:
    assert sse_frame({"a": 1}) == b'data: {"a":1}\n\n'
