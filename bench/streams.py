"""Many concurrent slow streams, each chunk's lag behind the upstream measured (for bench/capacity.py).

`python bench/streams.py SPEC_JSON`; SPEC has host, port, path, body, headers, streams and ramp (seconds over
which the streams open). Each chunk's content is the time.time() at which bench/upstream.py's /slow/ path sent
it, so a chunk's lag is its arrival time minus that (one machine, one clock). Prints one JSON line: streams
completed, errors, chunks, the largest and 99th-percentile lag after each stream's first chunk, and the
longest wait for a first chunk (ms).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

_STAMP = re.compile(rb'"content": ?"(\d+\.\d+)"')


async def one(spec: dict, request: bytes, delay: float, state: dict) -> None:
    await asyncio.sleep(delay)
    try:
        reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    except OSError:
        state["errors"] += 1
        return
    sent = time.time()
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if head[9:12] != b"200" or b"chunked" not in head.lower():
            state["errors"] += 1
            return
        first = True
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            data = await reader.readexactly(size + 2)
            now = time.time()
            for stamp in _STAMP.findall(data):
                if first:
                    state["first"].append(now - sent)
                    first = False
                else:
                    state["lags"].append(now - float(stamp))
        state["completed"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        state["errors"] += 1
    finally:
        writer.close()


async def run(spec: dict) -> dict:
    body = json.dumps(spec["body"]).encode()
    headers = "".join(f"{k}: {v}\r\n" for k, v in spec.get("headers", {}).items())
    request = (f"POST {spec['path']} HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\nConnection: close\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n").encode() + body
    state: dict = {"completed": 0, "errors": 0, "lags": [], "first": []}
    count, ramp = spec["streams"], spec.get("ramp", 0.0)
    await asyncio.gather(*(one(spec, request, ramp * i / count, state) for i in range(count)))
    lags = sorted(state["lags"])
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    return {"streams": count, "completed": state["completed"], "errors": state["errors"], "chunks": len(lags),
            "max_lag_ms": ms(lags[-1]) if lags else None,
            "p99_lag_ms": ms(lags[min(len(lags) - 1, int(0.99 * len(lags)))]) if lags else None,
            "p50_lag_ms": ms(lags[len(lags) // 2]) if lags else None,
            "max_first_chunk_ms": ms(max(state["first"])) if state["first"] else None}


def main() -> None:
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
