"""uni-api capacity: requests per second with --workers 2 against one worker, the CPU that shared state (Redis)
adds per request, and how many slow streams one worker carries.

    python bench/capacity.py            # default run (about two minutes)
    python bench/capacity.py --quick    # a few seconds per cell, 50 and 100 streams for 3 s

Non-stream cells (chat completions at concurrency 64 from bench/loadgen.py against bench/upstream.py):
    one worker, in memory     the default setup
    one worker, Redis         `state:` on a local redis-server; its gateway CPU per request minus the cell above
                              is what shared state adds (both set a rate_limit, so both record one window)
    two workers, Redis        `--workers 2`
Stream cells: 250, 500 and 1,000 concurrent streams through one worker, each one chunk every 100 ms for 10 s;
the most any chunk arrived behind the upstream's send time (after each stream's first chunk) and the worker's
peak RSS. The most streams with no chunk later than 50 ms is what one worker sustains. The largest count
straight from the upstream gives the lag the measuring setup has on its own.
Shared-state micro-benchmark: the CPU one admission costs in-process (Scheduler.admit, then SharedState.admit
one at a time and 16 at once, as concurrent requests share a pipeline), without the noise of a whole gateway.
Nothing is pinned to a core: two workers need both. Redis cells need redis-server (or valkey-server) and are
skipped without. Everything binds 127.0.0.1; every process started here is killed on exit. Writes
bench/capacity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

RATE_LIMIT = "100000000/min"  # never reached: every request checks and records one window
SLOW = {"chunks": 100, "interval_ms": 100}
TARGETS = {"shared_state_cpu_ms_per_request": 0.1, "stream_max_lag_ms": 50.0, "stream_peak_rss_mb": 150.0}


def start_redis(procs: bench.Procs, tmp: Path) -> tuple[subprocess.Popen, int] | None:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        return None
    port = bench.free_port()
    proc = procs.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    bench.wait_port(port, proc)
    return proc, port


def write_config(tmp: Path, upstream_port: int, redis_port: int | None) -> Path:
    """bench-json (answers at once) and bench-slow (SLOW's chunks) behind one key with RATE_LIMIT."""
    base = f"http://127.0.0.1:{upstream_port}"
    slow = f"{base}/slow/{SLOW['chunks']}/{SLOW['interval_ms']}/v1/chat/completions"
    text = (f"providers:\n"
            f"  - {{provider: bench-json, base_url: {base}/json/v1/chat/completions, api: sk-up-json,"
            f" model: [bench-json], preferences: {{cooldown_period: 0}}}}\n"
            f"  - {{provider: bench-slow, base_url: '{slow}', api: sk-up-slow, model: [bench-slow]}}\n"
            f"api_keys:\n  - {{api: {bench.KEY}, preferences: {{rate_limit: {RATE_LIMIT}}}}}\n")
    if redis_port is not None:
        text += f"state: {{redis_url: 'redis://127.0.0.1:{redis_port}/0', prefix: bench}}\n"
    path = tmp / f"capacity-{redis_port or 'memory'}.yaml"
    path.write_text(text)
    return path


def start_gateway(procs: bench.Procs, config: Path, workers: int, log: Path) -> tuple[subprocess.Popen, int]:
    port = bench.free_port()
    proc = procs.start([sys.executable, str(ROOT / "uni_api.py"), "--config", str(config), "--host", "127.0.0.1",
                        "--port", str(port), "--workers", str(workers)], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=log.open("ab"), env={**os.environ, "DISABLE_DATABASE": "true"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {log}")
        ready = bench.http_get(port, "/v1/models", {"Authorization": f"Bearer {bench.KEY}"}, timeout=0.5) == 200
        if ready and len(serving_pids(proc, workers)) == workers:
            return proc, port
        time.sleep(0.01)
    raise RuntimeError("gateway did not answer within 20 s")


def serving_pids(proc: subprocess.Popen, workers: int) -> list[int]:
    """The processes that serve: the gateway itself, or the supervisor's workers."""
    if workers == 1:
        return [proc.pid]
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def rps_cell(procs: bench.Procs, port: int, pids: list[int], redis_pid: int | None, *, warmup: float,
             duration: float) -> dict[str, Any]:
    """Non-stream requests at c64: rate, latency, and CPU per request of the serving processes and of Redis."""
    load = {"port": port, "path": "/v1/chat/completions", "kind": "nonstream", "concurrency": 64, "cpu": None,
            "watch_pid": None}
    bench.run_loadgen(procs, warmup=0.0, duration=warmup, **load)
    before = [bench.cpu_seconds(pid) for pid in [*pids, *([redis_pid] if redis_pid else [])]]
    result = bench.run_loadgen(procs, warmup=0.0, duration=duration, **load)
    after = [bench.cpu_seconds(pid) for pid in [*pids, *([redis_pid] if redis_pid else [])]]
    spent = [b - a for a, b in zip(before, after, strict=True)]
    per_request = lambda seconds: round(1000 * seconds / max(result["requests"], 1), 4)  # noqa: E731
    return {"rps": result["rps"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "requests": result["requests"], "errors": result["errors"],
            "gateway_cpu_ms_per_request": per_request(sum(spent[:len(pids)])),
            "redis_cpu_ms_per_request": per_request(spent[-1]) if redis_pid else None}


def stream_cell(procs: bench.Procs, port: int, pid: int | None, streams: int, chunks: int,
                path: str = "/v1/chat/completions") -> dict[str, Any]:
    """`streams` concurrent slow streams opened over one second; lag figures from bench/streams.py, and the CPU
    and memory of `pid` (the gateway) when given."""
    spec = {"host": "127.0.0.1", "port": port, "path": path, "streams": streams, "ramp": 1.0,
            "headers": {"Authorization": f"Bearer {bench.KEY}"},
            "body": {"model": "bench-slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}}
    before = bench.cpu_seconds(pid) if pid else 0.0
    out = subprocess.run([sys.executable, str(HERE / "streams.py"), json.dumps(spec)], capture_output=True,
                         text=True, timeout=60 + chunks * SLOW["interval_ms"] / 1000)
    if out.returncode:
        raise RuntimeError(f"bench/streams.py failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.splitlines()[-1])
    if pid:
        result.update(bench.memory_mb(pid), gateway_cpu_s=round(bench.cpu_seconds(pid) - before, 2))
    return result


def shared_state_microbench(redis_port: int, count: int) -> dict[str, float]:
    """CPU microseconds per admission: in memory, then through Redis one at a time and 16 at once."""
    import asyncio

    sys.path.insert(0, str(ROOT))
    import scheduler
    import uni_api

    limits = scheduler.parse_rate_limits(RATE_LIMIT)
    table = scheduler.ModelTable({}, default=limits)
    memory = scheduler.Scheduler()
    started = time.process_time()
    for _ in range(count):
        memory.admit("sk-bench", "m", table)
    result = {"in_memory_us": round(1e6 * (time.process_time() - started) / count, 1)}

    async def through_redis() -> None:
        shared = uni_api.SharedState(uni_api.StateOptions(f"redis://127.0.0.1:{redis_port}/0", "micro"))
        windows = shared.windows(("client", "sk-bench"), ("default", limits))
        ttls = [shared.name("cool", "p", "m"), shared.name("bench", "p", "k")]
        await shared.admit(windows, limits, ttls)  # loads the script
        for together in (1, 16):
            started = time.process_time()
            for _ in range(count // together):
                await asyncio.gather(*(shared.admit(windows, limits, ttls) for _ in range(together)))
            result[f"redis_c{together}_us"] = round(1e6 * (time.process_time() - started) / count, 1)
        assert shared.errors == 0, "Redis did not answer"
        await shared.close()

    asyncio.run(through_redis())
    return result


def measure(procs: bench.Procs, tmp: Path, up_port: int, redis: tuple[subprocess.Popen, int] | None, *,
            warmup: float, duration: float, streams: tuple[int, ...]) -> dict[str, Any]:
    log = tmp / "gateway.log"
    cells: dict[str, Any] = {}
    setups = [("one worker, in memory", None, 1)]
    if redis is not None:
        setups += [("one worker, Redis", redis, 1), ("two workers, Redis", redis, 2)]
    for label, shared, workers in setups:
        proc, port = start_gateway(procs, write_config(tmp, up_port, shared and shared[1]), workers, log)
        cells[label] = rps_cell(procs, port, serving_pids(proc, workers), shared and shared[0].pid,
                                warmup=warmup, duration=duration)
        print(f"  {label}: {cells[label]['rps']:.0f} req/s", file=sys.stderr, flush=True)
        if label == "one worker, in memory":
            for count in streams:  # smallest first: the worker's peak RSS then belongs to the largest
                cells[f"{count} streams"] = stream_cell(procs, port, proc.pid, count, SLOW["chunks"])
                print(f"  {count} slow streams: max lag {cells[f'{count} streams']['max_lag_ms']} ms", file=sys.stderr)
            slow = f"/slow/{SLOW['chunks']}/{SLOW['interval_ms']}/v1/chat/completions"
            direct = cells[f"{streams[-1]} streams, direct"] = stream_cell(procs, up_port, None, streams[-1],
                                                                         SLOW["chunks"], slow)
            print(f"  the same, direct: max lag {direct['max_lag_ms']} ms", file=sys.stderr)
        procs.stop(proc)
    return cells


def summarize(cells: dict[str, Any], counts: tuple[int, ...]) -> dict[str, Any]:
    memory, shared = cells["one worker, in memory"], cells.get("one worker, Redis")
    two = cells.get("two workers, Redis")
    added = None if shared is None else round(
        shared["gateway_cpu_ms_per_request"] - memory["gateway_cpu_ms_per_request"], 4)
    streams = cells[f"{counts[-1]} streams"]
    sustained = [n for n in counts if cells[f"{n} streams"]["max_lag_ms"] <= TARGETS["stream_max_lag_ms"]]
    return {"shared_state_cpu_ms_per_request": added,
            "two_workers_speedup": None if two is None or shared is None else round(two["rps"] / shared["rps"], 2),
            "stream_max_lag_ms": streams["max_lag_ms"], "stream_peak_rss_mb": streams.get("VmHWM"),
            "streams_sustained": max(sustained, default=None),
            "targets": {name: {"target": limit, "met": None if (value := {
                "shared_state_cpu_ms_per_request": added, "stream_max_lag_ms": streams["max_lag_ms"],
                "stream_peak_rss_mb": streams.get("VmHWM")}[name]) is None else value < limit}
                        for name, limit in TARGETS.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per cell, 100 streams")
    parser.add_argument("--streams", help="concurrent slow streams, comma-separated (default 250,500,1000)")
    parser.add_argument("--output", default=str(HERE / "capacity.json"))
    args = parser.parse_args(argv)
    warmup, duration = (0.5, 2.0) if args.quick else (2.0, 8.0)
    streams = tuple(sorted(int(n) for n in (args.streams or ("50,100" if args.quick else "250,500,1000")).split(",")))
    SLOW["chunks"] = 30 if args.quick else 100
    procs = bench.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="uni-api-capacity-"))
    try:
        upstream = procs.start([sys.executable, str(HERE / "upstream.py"), str(up_port := bench.free_port())])
        bench.wait_port(up_port, upstream)
        redis = start_redis(procs, tmp)
        cells = measure(procs, tmp, up_port, redis, warmup=warmup, duration=duration, streams=streams)
        if redis is not None:
            cells["shared state micro-benchmark"] = shared_state_microbench(redis[1], 2000 if args.quick else 10000)
        results = {"mode": "quick" if args.quick else "default", "cores": os.cpu_count(),
                   "load_average": os.getloadavg(), "python": sys.version.split()[0], "cells": cells,
                   "slow_stream": dict(SLOW), "summary": summarize(cells, streams)}
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
