"""A fast fake OpenAI upstream for the benchmark: fixed chat.completion JSON, or ~20 SSE chunks + [DONE].

Run as its own process: `python bench/upstream.py PORT [CPU]`. Paths /json/... always answer JSON and
/sse/... always stream (so nginx, which cannot read bodies, can serve the same URLs); any other path
decides by the request's `"stream": true`. /slow/COUNT/MS/... streams COUNT chunks MS milliseconds apart,
each carrying the time it was sent (time.time()) as its content, for bench/capacity.py's lag measure.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from aiohttp import web

CREATED = 1700000000
BASE = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": "bench-up"}
TOKENS = [f" tok{i}" for i in range(20)]


def completion_body() -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": CREATED, "model": "bench-up",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(TOKENS), "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29},
    }).encode()


def sse_events() -> list[bytes]:
    """Role chunk, 20 content chunks, finish chunk, [DONE]: 23 frames."""
    def frame(choice_delta: dict, finish: str | None = None) -> bytes:
        chunk = {**BASE, "choices": [{"index": 0, "delta": choice_delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    return ([frame({"role": "assistant", "content": ""})] + [frame({"content": t}) for t in TOKENS]
            + [frame({}, "stop"), b"data: [DONE]\n\n"])


COMPLETION = completion_body()
SSE = sse_events()


def slow_frame(content: str) -> bytes:
    chunk = {**BASE, "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def slow_stream(request: web.Request, count: int, interval: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for _ in range(count):
        await response.write(slow_frame(f"{time.time():.6f}"))
        await asyncio.sleep(interval)
    await response.write(SSE[-2] + SSE[-1])  # the finish chunk and [DONE]
    await response.write_eof()
    return response


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    kind = request.path.split("/", 2)[1]
    if kind == "slow":
        count, interval_ms = request.path.split("/")[2:4]
        return await slow_stream(request, int(count), int(interval_ms) / 1000)
    stream = kind == "sse" or (kind != "json" and b'"stream":true' in body.replace(b" ", b""))
    if not stream:
        return web.Response(body=COMPLETION, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for frame in SSE:
        await response.write(frame)
    await response.write_eof()
    return response


def main() -> None:
    port = int(sys.argv[1])
    if len(sys.argv) > 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(sys.argv[2])})
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
