"""A cheap HTTP/1.1 keep-alive load generator on raw asyncio streams (no SDK, no httpx).

`python bench/loadgen.py SPEC_JSON`; SPEC has host, port, path, body, headers, concurrency, warmup,
duration, cpu and optionally requests (stop after that many; duration still caps the run). Prints "START"
when the measured window opens, then one JSON line of results.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def read_response(reader: asyncio.StreamReader, sent: float) -> tuple[int, float, bool]:
    """(status, seconds to the first body byte, keep-alive) after reading one whole response."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    ttfb = 0.0
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if not ttfb:
                ttfb = time.perf_counter() - sent
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            await reader.readexactly(size + 2)
    elif b"content-length:" in lower:
        start = lower.index(b"content-length:") + 15
        length = int(lower[start:lower.index(b"\r\n", start)])
        if length:
            await reader.readexactly(length)
        ttfb = time.perf_counter() - sent
    else:
        await reader.read()
        return status, time.perf_counter() - sent, False
    return status, ttfb, b"connection: close" not in lower


async def worker(spec: dict, request: bytes, state: dict) -> None:
    reader = writer = None
    while not state["stop"]:
        if writer is None:
            reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
        sent = time.perf_counter()
        try:
            writer.write(request)
            status, ttfb, keep = await read_response(reader, sent)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            state["errors"] += 1
            writer.close()
            writer = None
            continue
        done = time.perf_counter()
        if state["measuring"] and not state["stop"]:
            state["latency"].append(done - sent)
            state["ttfb"].append(ttfb)
            if status != 200:
                state["errors"] += 1
        if not keep:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def run(spec: dict) -> dict:
    body = json.dumps(spec["body"]).encode()
    headers = "".join(f"{k}: {v}\r\n" for k, v in spec.get("headers", {}).items())
    request = (f"POST {spec['path']} HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n").encode() + body
    state = {"stop": False, "measuring": False, "latency": [], "ttfb": [], "errors": 0}
    tasks = [asyncio.ensure_future(worker(spec, request, state)) for _ in range(spec["concurrency"])]
    await asyncio.sleep(spec["warmup"])
    state["measuring"] = True
    print("START", flush=True)
    started = time.perf_counter()
    if spec.get("requests"):
        while len(state["latency"]) < spec["requests"] and time.perf_counter() - started < spec["duration"]:
            await asyncio.sleep(0.05)
    else:
        await asyncio.sleep(spec["duration"])
    state["stop"] = True
    elapsed = time.perf_counter() - started
    await asyncio.wait(tasks, timeout=10)
    latency, ttfb = sorted(state["latency"]), sorted(state["ttfb"])
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {"requests": len(latency), "errors": state["errors"], "seconds": round(elapsed, 3),
            "rps": round(len(latency) / elapsed, 1), "p50_ms": ms(percentile(latency, 0.5)),
            "p99_ms": ms(percentile(latency, 0.99)), "ttfb_p50_ms": ms(percentile(ttfb, 0.5)),
            "ttfb_p99_ms": ms(percentile(ttfb, 0.99))}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec["cpu"]})
    print(json.dumps(asyncio.run(run(spec))), flush=True)


if __name__ == "__main__":
    main()
