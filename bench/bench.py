"""uni-api benchmark: throughput, latency, CPU and memory of the gateway against a fast local upstream.

    python bench/bench.py            # default run (< 3 minutes)
    python bench/bench.py --quick    # a few seconds per cell
    python bench/bench.py --profile  # also sample the gateway with py-spy under load (if installed)

Upstream: nginx when installed, else bench/upstream.py (aiohttp) in its own process. Load: wrk for
non-stream cells when installed, else bench/loadgen.py (raw asyncio streams) in its own process; stream
cells always use loadgen.py, which measures time to first byte. Direct-upstream runs are interleaved
with gateway runs so machine noise hits both. Everything binds 127.0.0.1; every process started here is
killed (by process group) on exit. Writes bench/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import compileall
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import upstream as fake_upstream  # noqa: E402

KEY = "sk-bench-client"
MODELS = {"nonstream": "bench-json", "stream": "bench-sse"}
CONCURRENCY = (1, 16, 64)
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = {
    "cpu_ms_per_request": 0.5,
    "added_p50_ms_c1": 1.0,
    "rps_nonstream_c16": 1500,
    "stream_us_per_chunk": 20.0,
    "idle_rss_mb": 40.0,
    "cold_start_s": 1.0,
}

# --- Processes ---


class Procs:
    """Every child started here, killed by process group at the end."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []

    def start(self, args: list[str], *, cpu: int | None = None, **kwargs: Any) -> subprocess.Popen:
        def pin() -> None:
            if cpu is not None and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {cpu})

        proc = subprocess.Popen(args, start_new_session=True, preexec_fn=pin, **kwargs)
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        if proc in self.children:
            self.children.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.children)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cores() -> dict[str, int | None]:
    """Gateway, upstream and load generator cores; on two cores the load shares the upstream's."""
    if not hasattr(os, "sched_getaffinity"):
        return {"gateway": None, "upstream": None, "load": None}
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) == 1:
        return {"gateway": None, "upstream": None, "load": None}
    return {"gateway": mine[0], "upstream": mine[1], "load": mine[2] if len(mine) > 2 else mine[1]}


def http_get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 1.0) -> int:
    """Status of one GET, 0 when nothing answers."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode())
            head = sock.recv(64)
            return int(head[9:12]) if head.startswith(b"HTTP/1.") else 0
    except OSError:
        return 0


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


# --- Upstream ---


def _nginx_conf(tmp: Path, port: int) -> str:
    json_body = fake_upstream.COMPLETION.decode()
    sse_body = b"".join(fake_upstream.SSE).decode()
    assert "'" not in json_body + sse_body and "$" not in json_body + sse_body
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location /json/ {{ default_type application/json; return 200 '{json_body}'; }}
        location /sse/ {{ default_type text/event-stream; return 200 '{sse_body}'; }}
    }}
}}
"""


def start_upstream(procs: Procs, tmp: Path, cpu: int | None) -> tuple[int, str]:
    port = free_port()
    nginx = shutil.which("nginx")
    if nginx:
        conf = tmp / "nginx.conf"
        conf.write_text(_nginx_conf(tmp, port))
        proc = procs.start([nginx, "-c", str(conf), "-p", str(tmp)], cpu=cpu, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        kind = "nginx"
    else:
        proc = procs.start([sys.executable, str(HERE / "upstream.py"), str(port)], cpu=cpu)
        kind = "aiohttp (bench/upstream.py)"
    wait_port(port, proc)
    return port, kind


# --- Gateway ---


def write_config(tmp: Path, upstream_port: int) -> Path:
    providers = "".join(f"""
  - provider: bench-{kind}
    base_url: http://127.0.0.1:{upstream_port}/{'json' if kind == 'nonstream' else 'sse'}/v1/chat/completions
    api: sk-upstream-{kind}
    model: [{model}]
    preferences: {{cooldown_period: 0}}
""" for kind, model in MODELS.items())
    path = tmp / "api.yaml"
    path.write_text(f"providers:{providers}\napi_keys:\n  - api: {KEY}\n    model: [all]\n")
    return path


def start_gateway(procs: Procs, config: Path, cpu: int | None, log: Path) -> tuple[subprocess.Popen, int, float]:
    """(process, port, seconds from exec to the first 200 on /v1/models)."""
    port = free_port()
    started = time.perf_counter()
    proc = procs.start([sys.executable, str(ROOT / "uni_api.py"), "--config", str(config), "--host", "127.0.0.1",
                        "--port", str(port)], cpu=cpu, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=log.open("ab"), env={**os.environ, "DB_PATH": str(config.parent / "stats.db")})
    deadline = started + 20
    auth = {"Authorization": f"Bearer {KEY}"}
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        if http_get(port, "/v1/models", auth, timeout=0.5) == 200:
            cold = time.perf_counter() - started
            if http_get(port, "/healthz") != 200:
                raise RuntimeError("gateway /healthz is not 200")
            return proc, port, cold
        time.sleep(0.003)
    raise RuntimeError("gateway did not answer /v1/models within 20s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


def memory_mb(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    return {k: round(int(v) / 1024, 1) for k, v in values.items()}


# The stack in layers, imported one after another into a fresh interpreter: what each costs in RSS before
# any gateway code runs. A layer's missing optional modules (the speedups) are skipped.
MEMORY_LAYERS = (
    ("interpreter", ()),
    ("asyncio + ssl", ("asyncio", "ssl")),
    ("aiohttp", ("aiohttp",)),
    ("starlette, uvicorn, ruamel.yaml", ("starlette.applications", "starlette.routing", "starlette.responses",
                                         "uvicorn", "uvicorn.server", "uvicorn.lifespan.on",
                                         "uvicorn.protocols.http.auto", "ruamel.yaml")),
    ("speedups (uvloop, httptools, orjson)", ("uvloop", "httptools", "orjson")),
    ("uni_api, adapters, scheduler (imported)", ("uni_api",)),
)
_LAYERS_SCRIPT = """
import importlib, json, re, sys
sys.path.insert(0, sys.argv[1])
def rss():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\\s+(\\d+)", status.read()).group(1)) / 1024
out = []
for label, modules in json.loads(sys.argv[2]):
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    out.append([label, round(rss(), 1)])
print(json.dumps(out))
"""


def memory_layers() -> list[tuple[str, float, float]]:
    """(layer, RSS MB after importing it and every layer before, MB the layer added)."""
    proc = subprocess.run([sys.executable, "-c", _LAYERS_SCRIPT, str(ROOT), json.dumps(MEMORY_LAYERS)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"measuring the import layers failed:\n{proc.stderr[-2000:]}")
    rows, before = [], 0.0
    for label, total in json.loads(proc.stdout):
        rows.append((label, total, round(total - before, 1)))
        before = total
    return rows


def measure_floor(procs: Procs, up_port: int, core: dict, *, rounds: int, warmup: float, duration: float
                  ) -> dict[str, Any]:
    """bench/floor.py (uvicorn + Starlette + one aiohttp call, none of the gateway) at non-stream c16."""
    port = free_port()
    proc = procs.start([sys.executable, str(HERE / "floor.py"), str(port),
                        f"http://127.0.0.1:{up_port}/json/v1/chat/completions"], cpu=core["gateway"])
    try:
        wait_port(port, proc)
        runs = [run_loadgen(procs, port=port, path="/v1/chat/completions", kind="nonstream", concurrency=16,
                            warmup=warmup, duration=duration, cpu=core["load"], watch_pid=proc.pid)
                for _ in range(rounds)]
    finally:
        procs.stop(proc)
    return merge(runs)


# --- Load ---


def request_body(kind: str) -> dict[str, Any]:
    return {"model": MODELS[kind], "messages": [{"role": "system", "content": "You are terse."},
                                                {"role": "user", "content": "Say hello in twenty tokens."}],
            "stream": kind == "stream", "temperature": 0}


def run_loadgen(procs: Procs, *, port: int, path: str, kind: str, concurrency: int, warmup: float,
                duration: float, cpu: int | None, watch_pid: int | None, requests: int | None = None
                ) -> dict[str, Any]:
    spec = {"host": "127.0.0.1", "port": port, "path": path, "body": request_body(kind), "cpu": cpu,
            "headers": {"Authorization": f"Bearer {KEY}"}, "concurrency": concurrency, "warmup": warmup,
            "duration": duration, "requests": requests}
    proc = procs.start([sys.executable, str(HERE / "loadgen.py"), json.dumps(spec)], stdout=subprocess.PIPE,
                       text=True)
    try:
        cpu_before = None
        result: dict[str, Any] = {}
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == "START":
                cpu_before = cpu_seconds(watch_pid) if watch_pid else None
            elif line.startswith("{"):
                result = json.loads(line)
                if watch_pid and cpu_before is not None:
                    result["cpu_s"] = cpu_seconds(watch_pid) - cpu_before
        proc.wait(15)
    finally:
        procs.stop(proc)
    if not result:
        raise RuntimeError("load generator printed no result")
    return result


_WRK_LUA = 'wrk.method = "POST"\nwrk.body = {body}\nwrk.headers["Content-Type"] = "application/json"\n' \
           'wrk.headers["Authorization"] = "Bearer {key}"\n'
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def run_wrk(procs: Procs, tmp: Path, *, port: int, path: str, kind: str, concurrency: int, warmup: float,
            duration: float, cpu: int | None, watch_pid: int | None) -> dict[str, Any]:
    script = tmp / "post.lua"
    script.write_text(_WRK_LUA.format(body=json.dumps(json.dumps(request_body(kind))), key=KEY))
    url = f"http://127.0.0.1:{port}{path}"
    wrk = shutil.which("wrk") or "wrk"
    if warmup:
        warm = procs.start([wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(warmup))}s", "-s", str(script), url],
                           cpu=cpu, stdout=subprocess.DEVNULL)
        warm.wait(warmup + 15)
        procs.stop(warm)
    before = cpu_seconds(watch_pid) if watch_pid else None
    proc = procs.start([wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", "-s",
                        str(script), url], cpu=cpu, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=duration + 30)
    procs.stop(proc)
    result: dict[str, Any] = {}
    if watch_pid and before is not None:
        result["cpu_s"] = cpu_seconds(watch_pid) - before
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        result[key] = round(float(match[1]) * _WRK_UNITS[match[2]], 3) if match else None
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result.update(requests=int(total[1]) if total else 0, rps=float(rps[1]) if rps else 0.0,
                  errors=int(errors[1]) if errors else 0, ttfb_p50_ms=None, ttfb_p99_ms=None)
    return result


# --- Micro-benchmark: stream conversion per chunk ---


def _openai_events(n: int) -> list[tuple[str, str]]:
    frames = [f[6:-2].decode() for f in fake_upstream.SSE]
    role, contents, finish, done = frames[0], frames[1:-2], frames[-2], frames[-1]
    body = [contents[i % len(contents)] for i in range(n - 3)]
    return [("message", e) for e in (role, *body, finish, done)]


def _cohere_events(n: int) -> list[tuple[str, str]]:
    fixture = ROOT / "tests" / "fixtures" / "cohere" / "text.upstream.sse"
    events = []
    if fixture.exists():
        for block in fixture.read_text().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.strip().splitlines() if ": " in line)
            if "data" in lines:
                events.append((lines.get("event", "message"), lines["data"]))
    if not events:
        events = [("message-start", json.dumps({"id": "x", "type": "message-start", "delta": {"message": {
            "role": "assistant"}}})), ("message-end", json.dumps({"type": "message-end", "delta": {
                "finish_reason": "COMPLETE", "usage": {"billed_units": {"input_tokens": 1, "output_tokens": 1}}}}))]
    delta = ("content-delta", json.dumps({"type": "content-delta", "index": 0, "delta": {"message": {
        "content": {"text": " tok"}}}}))
    head = [e for e in events if '"message-end"' not in e[1]]
    tail = [e for e in events if '"message-end"' in e[1]]
    return head + [delta] * max(0, n - len(head) - len(tail)) + tail


def _cloudflare_events(n: int) -> list[tuple[str, str]]:
    body = [("message", json.dumps({"response": f" tok{i % 20}", "p": "abcdefgh"})) for i in range(n - 2)]
    usage = {"prompt_tokens": 9, "completion_tokens": n - 2, "total_tokens": n + 7}
    return body + [("message", json.dumps({"response": "", "usage": usage})), ("message", "[DONE]")]


def _claude_events(n: int) -> list[tuple[str, str]]:
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
             "model": "claude", "content": [], "stop_reason": None, "usage": {"input_tokens": 9, "output_tokens": 1}}}
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " tok"}}
    tail = [("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": n}}),
            ("message_stop", {"type": "message_stop"})]
    events = [("message_start", start), ("content_block_start", block)]
    events += [("content_block_delta", delta)] * max(0, n - len(events) - len(tail)) + tail
    return [(name, json.dumps(data)) for name, data in events]


def _gemini_events(n: int) -> list[tuple[str, str]]:
    def part(text: str, finish: str | None = None, usage: bool = False) -> str:
        cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        out: dict[str, Any] = {"candidates": [cand], "modelVersion": "gemini"}
        if usage:
            out["usageMetadata"] = {"promptTokenCount": 9, "candidatesTokenCount": n, "totalTokenCount": n + 9}
        return json.dumps(out)

    return [("message", part(" tok")) for _ in range(n - 1)] + [("message", part("", "STOP", True))]


def _aws_events(n: int) -> list[tuple[str, str]]:
    """Bedrock carries the Anthropic events, each as one event-stream `chunk` message."""
    return [("chunk", data) for _, data in _claude_events(n)]


def _responses_events(n: int) -> list[tuple[str, str]]:
    """A Responses API stream ("Streaming events"): created, in_progress, one message item's text deltas, the
    item's closing events and response.completed."""
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    usage = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n + 9}
    head = [{"type": "response.created", "response": {"id": "resp_1", "created_at": 1, "status": "in_progress"}},
            {"type": "response.in_progress", "response": {"id": "resp_1", "status": "in_progress"}},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.content_part.added", **where, "part": part}]
    tail = [{"type": "response.output_text.done", **where, "text": "", "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": {**item, "status": "completed"}},
            {"type": "response.completed", "response": {"id": "resp_1", "status": "completed", "usage": usage}}]
    delta = {"type": "response.output_text.delta", **where, "delta": " tok", "logprobs": []}
    events = head + [delta] * max(0, n - len(head) - len(tail)) + tail
    return [(e["type"], json.dumps({**e, "sequence_number": i})) for i, e in enumerate(events)]


# Representative upstream events per engine (first the recorded fixture where tests/fixtures has one).
ENGINE_EVENTS = {"gpt": _openai_events, "openrouter": _openai_events, "azure": _openai_events,
                 "cohere": _cohere_events, "cloudflare": _cloudflare_events, "claude": _claude_events,
                 "vertex-claude": _claude_events, "aws": _aws_events, "gemini": _gemini_events,
                 "vertex-gemini": _gemini_events, "responses": _responses_events}


def _sse_bytes(events: list[tuple[str, str]]) -> bytes:
    return b"".join((f"event: {n}\n" if n != "message" else "").encode() + f"data: {d}\n\n".encode()
                    for n, d in events)


_AWS_CHUNK_HEADERS = b"".join(bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
                              for k, v in ((":event-type", "chunk"), (":content-type", "application/json"),
                                           (":message-type", "event")))


def _aws_bytes(events: list[tuple[str, str]]) -> bytes:
    """AWS event-stream messages (prelude and its CRC, string headers, payload, message CRC): Bedrock's
    InvokeModelWithResponseStream framing, each payload {"bytes": base64 of one event}."""
    out = bytearray()
    for _, data in events:
        payload = json.dumps({"bytes": base64.b64encode(data.encode()).decode()}).encode()
        prelude = struct.pack(">II", 16 + len(_AWS_CHUNK_HEADERS) + len(payload), len(_AWS_CHUNK_HEADERS))
        message = prelude + struct.pack(">I", zlib.crc32(prelude)) + _AWS_CHUNK_HEADERS + payload
        out += message + struct.pack(">I", zlib.crc32(message))
    return bytes(out)


WIRE_ENCODERS = {"sse": _sse_bytes, "aws": _aws_bytes}


async def _convert_once(adapter: Any, events: list[Any], raw: bytes | None, face: str | None = None) -> int:
    """One stream through an adapter; with `raw`, the whole path: bytes -> framing -> conversion -> the frames
    sent to the client (OpenAI chat SSE, or with `face` that face's stream, e.g. Responses events)."""
    import adapters

    if raw is not None:
        async def source():
            yield raw
        frames, upstream = 0, source()
        framed = adapter.iter_events(upstream)
        render = adapters.FACES[face].stream(_FACE_BODIES[face], "bench-model") if face else None
        async with contextlib.aclosing(adapter.parse_stream(framed, "bench-model", include_usage=True)) as chunks:
            async for chunk in chunks:
                if render is None:
                    adapters.sse_frame(chunk)
                else:
                    render.on_chunk(chunk)
                frames += 1
        if render is not None:
            render.end()
        for gen in (framed, upstream):  # parse_stream may stop at [DONE] before its source is exhausted
            await gen.aclose()
        return frames

    async def feed():
        for event in events:
            yield event

    count, fed = 0, feed()
    async with contextlib.aclosing(adapter.parse_stream(fed, "bench-model")) as chunks:
        async for _ in chunks:
            count += 1
    await fed.aclose()
    return count


# The client request each face's renderer is built for (Codex's shape: streamed, store off, reasoning summaries).
_FACE_BODIES: dict[str, dict[str, Any]] = {
    "responses": {"model": "bench-model", "input": "hi", "stream": True, "store": False,
                  "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"]},
}


def _best_per_event(adapter: Any, events: list[Any], raw: bytes | None, budget: float,
                    face: str | None = None) -> tuple[float, int]:
    """(best seconds per upstream event over about `budget` seconds of repeats, chunks out)."""
    loop = asyncio.new_event_loop()
    try:
        out = loop.run_until_complete(_convert_once(adapter, events, raw, face))
        best, rounds, deadline = float("inf"), 0, time.perf_counter() + budget
        while time.perf_counter() < deadline or rounds < 3:
            t0 = time.perf_counter()
            loop.run_until_complete(_convert_once(adapter, events, raw, face))
            best = min(best, time.perf_counter() - t0)
            rounds += 1
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return best / len(events), out


def stream_microbench(budget: float) -> dict[str, Any]:
    """Per upstream event: parse_stream alone; framing + parse_stream + the chat SSE frame; and, where the
    Responses face exists, framing + parse_stream + its Responses events. Each timed for about `budget`
    seconds (best run counts)."""
    import adapters

    n = 200
    faces = getattr(adapters, "FACES", {})
    results: dict[str, Any] = {}
    for engine, adapter in adapters.ADAPTERS.items():
        maker = ENGINE_EVENTS.get(engine)
        if maker is None:
            results[engine] = {"skipped": "no representative events written for this engine yet"}
            continue
        pairs = maker(n)
        events = [adapters.SSEEvent(name, data) for name, data in pairs]
        encode = WIRE_ENCODERS.get(adapter.stream_format)
        raw = encode(pairs) if encode else None
        entry: dict[str, Any] = {"events": len(events), "full_us": None, "responses_us": None}
        try:
            seconds, entry["chunks_out"] = _best_per_event(adapter, events, None, budget)
            entry["parse_us"] = round(seconds * 1e6, 2)
            if raw is not None:
                entry["full_us"] = round(_best_per_event(adapter, events, raw, budget)[0] * 1e6, 2)
            if raw is not None and "responses" in faces:
                entry["responses_us"] = round(_best_per_event(adapter, events, raw, budget, "responses")[0] * 1e6, 2)
        except Exception as exc:  # a conversion bug is a note here, not a crash of the benchmark
            results[engine] = {"skipped": f"conversion raised {type(exc).__name__}: {exc}"[:200]}
            continue
        results[engine] = entry
    return results


# --- Profiling (py-spy, optional) ---


def _group(frame: str) -> str:
    path = frame[frame.rfind("(") + 1:].rstrip(")")
    for name in ("uvicorn", "starlette", "aiohttp", "h11", "httptools", "uvloop", "yarl", "multidict",
                 "anyio", "asyncio", "json", "logging"):
        if f"/{name}/" in path or f"{name}/" in path.split("site-packages/")[-1][: len(name) + 1]:
            return name
    if "uni_api.py" in path:
        return "uni_api.py"
    if "adapters.py" in path or "scheduler.py" in path:
        return path.split(":")[0].rsplit("/", 1)[-1]
    return "other (stdlib/C)"


def _function(frame: str) -> str:
    """`name (path:line)` to `name (file)`: one entry per function, whatever line was sampled."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].split('site-packages/')[-1]})" if where else name


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_function(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        n = int(count)
        total += n
        if frames:
            self_time[frames[-1]] += n
            groups[_group(frames[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n
    pct = lambda c: round(100 * c / total, 1) if total else 0.0  # noqa: E731
    return {"samples": total,
            "self": [(f, pct(c)) for f, c in self_time.most_common(top)],
            "inclusive": [(f, pct(c)) for f, c in inclusive.most_common(top + 10)],
            "by_package_self": [(g, pct(c)) for g, c in groups.most_common()]}


def profile_gateway(procs: Procs, tmp: Path, gw_pid: int, gw_port: int, core: dict, seconds: float
                    ) -> dict[str, Any]:
    spy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                     if (Path(sys.executable).parent / "py-spy").exists() else None)
    if spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy into the venv)"}
    out: dict[str, Any] = {}
    for kind in ("nonstream", "stream"):
        raw_path = tmp / f"profile_{kind}.txt"
        spy_proc = procs.start([spy, "record", "-p", str(gw_pid), "-d", str(int(seconds)), "-r", "250",
                                "--nonblocking", "--format", "raw", "-o", str(raw_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        run_loadgen(procs, port=gw_port, path="/v1/chat/completions", kind=kind, concurrency=16, warmup=0.2,
                    duration=seconds, cpu=core["load"], watch_pid=None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy_proc.wait(seconds + 20)
        err = spy_proc.stderr.read().decode()[-300:] if spy_proc.stderr else ""
        procs.stop(spy_proc)
        if not raw_path.exists():
            out[kind] = {"skipped": f"py-spy failed: {err.strip()}"}
            continue
        shutil.copy(raw_path, HERE / f"profile_{kind}.txt")
        out[kind] = summarize_profile(raw_path.read_text())
    return out


# --- Report ---


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else "PASS" if ok else "FAIL"


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(results: dict[str, Any]) -> str:
    lines = [f"uni-api bench ({results['mode']}) upstream={results['upstream']} load={results['loader']} "
             f"cores={results['cores']} speedups={results['speedups']}", ""]
    head = (f"{'mode':<10}{'conc':>5}{'gw rps':>9}{'up rps':>9}{'gw p50':>8}{'gw p99':>8}{'up p50':>8}"
            f"{'+p50 ms':>8}{'+p99 ms':>8}{'cpu ms/rq':>10}{'ttfb p50':>9}{'up ttfb':>8}{'err':>5}")
    lines += [head, "-" * len(head)]
    for cell in results["cells"]:
        gw, up = cell["gateway"], cell["direct"]
        lines.append(f"{cell['kind']:<10}{cell['concurrency']:>5}{gw['rps']:>9.0f}{up['rps']:>9.0f}"
                     f"{_fmt(gw['p50_ms']):>8}{_fmt(gw['p99_ms']):>8}{_fmt(up['p50_ms']):>8}"
                     f"{_fmt(cell['added_p50_ms']):>8}{_fmt(cell['added_p99_ms']):>8}"
                     f"{_fmt(cell['cpu_ms_per_request'], '.3f'):>10}"
                     f"{_fmt(gw['ttfb_p50_ms'] if cell['kind'] == 'stream' else None):>9}"
                     f"{_fmt(up['ttfb_p50_ms'] if cell['kind'] == 'stream' else None):>8}"
                     f"{gw['errors'] + up['errors']:>5}")
    mem, cold = results["memory_mb"], results["cold_start_s"]
    lines += ["", f"RSS idle {mem['idle_rss']} MB, after the cells {mem['after_cells_rss']} MB, after "
                  f"{mem['soak_requests']} more requests {mem['end_rss']} MB (growth {mem['growth']} MB), peak "
                  f"(VmHWM) {mem['peak_hwm']} MB",
              f"cold start (exec -> first 200 on /v1/models) runs {cold['runs']} median {cold['median']} s", "",
              "RSS by layer, imported one after another into a fresh interpreter (MB):"]
    lines += [f"  {label:<44}{added:>+6.1f}  = {total:5.1f}" for label, total, added in mem["layers"]]
    floor, cell = results["stack_floor"], next(c for c in results["cells"] if (c["kind"], c["concurrency"]) ==
                                               ("nonstream", 16))
    own = (None if None in (floor["cpu_ms_per_request"], cell["cpu_ms_per_request"])
           else round(cell["cpu_ms_per_request"] - floor["cpu_ms_per_request"], 3))
    stack_note = ["", f"stack floor (bench/floor.py: uvicorn + Starlette + one aiohttp call, no gateway logic), "
                      f"non-stream c16: {floor['rps']:.0f} req/s, {_fmt(floor['cpu_ms_per_request'], '.3f')} ms CPU "
                      f"per request; the gateway's own work adds {_fmt(own, '.3f')} ms"]
    running = round(mem["idle_rss"] - mem["layers"][-1][1], 1)
    lines += [f"  {'running (config, sessions, stats, event loop)':<44}{running:>+6.1f}  = {mem['idle_rss']:5.1f}",
              *stack_note, "",
              "stream conversion per upstream event (best of repeated runs, 200 events):",
              f"  {'engine':<14}{'parse_stream µs':>16}{'framing+parse+frame µs':>24}{'... as Responses µs':>21}"]
    for engine, entry in results["stream_conversion"].items():
        if "skipped" in entry:
            lines.append(f"  {engine:<14}skipped: {entry['skipped']}")
        else:
            lines.append(f"  {engine:<14}{_fmt(entry['parse_us']):>16}{_fmt(entry['full_us']):>24}"
                         f"{_fmt(entry.get('responses_us')):>21}")
    lines += ["", "targets:"]
    for name, (value, target, ok) in results["targets"].items():
        lines.append(f"  {verdict(ok)}  {name:<44} measured {_fmt(value, '.3f'):>9}   target {target}")
    for kind, prof in results.get("profile", {}).items():
        lines += ["", f"profile ({kind}, concurrency 16, py-spy self time):"]
        if "skipped" in prof:
            lines.append(f"  skipped: {prof['skipped']}")
            continue
        lines += [f"  {pct:5.1f}%  {frame}" for frame, pct in prof["self"][:10]]
        lines.append("  by package: " + ", ".join(f"{g} {p}%" for g, p in prof["by_package_self"]))
    return "\n".join(lines)


def judge(results: dict[str, Any]) -> dict[str, tuple[Any, Any, bool | None]]:
    cells = {(c["kind"], c["concurrency"]): c for c in results["cells"]}
    cpu = cells.get(("nonstream", 16), {}).get("cpu_ms_per_request")
    added = cells.get(("nonstream", 1), {}).get("added_p50_ms")
    rps = cells.get(("nonstream", 16), {}).get("gateway", {}).get("rps")
    conv = [max(e["full_us"] if e.get("full_us") is not None else e["parse_us"], e.get("responses_us") or 0)
            for e in results["stream_conversion"].values() if "skipped" not in e]
    skipped = any("skipped" in e for e in results["stream_conversion"].values())
    worst = max(conv) if conv else None
    mem = results["memory_mb"]
    floor = mem["layers"][-2][1]  # every layer but ours
    check = lambda v, ok: (None if v is None else ok(v))  # noqa: E731
    return {
        "gateway CPU per passthrough request (ms, c16)": (cpu, "<= 0.5", check(cpu, lambda v: v <= 0.5)),
        "added p50 latency at c1, non-stream (ms)": (added, "<= 1.0", check(added, lambda v: v <= 1.0)),
        "non-stream req/s at c16": (rps, ">= 1500", check(rps, lambda v: v >= 1500)),
        "stream conversion, worst engine (µs/chunk)" + (" [some skipped]" if skipped else ""):
            (worst, "<= 20", check(worst, lambda v: v <= 20)),
        f"idle RSS (MB; the dependencies' imports alone: {floor})": (mem["idle_rss"], "<= 40",
                                                                      check(mem["idle_rss"], lambda v: v <= 40)),
        f"RSS growth over {mem['soak_requests']} requests (MB)": (mem["growth"], "< 10",
                                                                  check(mem["growth"], lambda v: v < 10)),
        "cold start, median (s)": (results["cold_start_s"]["median"], "< 1",
                                   check(results["cold_start_s"]["median"], lambda v: v < 1)),
    }


# --- Main ---


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one target: summed counts, median of per-round rates and percentiles."""
    med = lambda k: (statistics.median([r[k] for r in runs if r.get(k) is not None])  # noqa: E731
                     if any(r.get(k) is not None for r in runs) else None)
    merged = {k: med(k) for k in ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms")}
    merged.update(requests=sum(r["requests"] for r in runs), errors=sum(r["errors"] for r in runs),
                  cpu_s=sum(r.get("cpu_s", 0.0) for r in runs))
    watched = merged["requests"] and any("cpu_s" in r for r in runs)  # CPU is read for a watched process only
    merged["cpu_ms_per_request"] = round(1000 * merged["cpu_s"] / merged["requests"], 4) if watched else None
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: a few seconds per cell")
    parser.add_argument("--profile", action="store_true", help="also profile the gateway with py-spy")
    parser.add_argument("--requests", type=int, help="requests of the memory soak (default 100000, quick 10000)")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    rounds, duration, warmup, cold_runs = (1, 1.5, 0.3, 2) if args.quick else (2, 3.0, 0.5, 3)
    soak_requests = args.requests or (10_000 if args.quick else 100_000)
    # Python caches bytecode on a module's first import; start from that state even where it is not written
    # (PYTHONDONTWRITEBYTECODE), as compiling from source on every start would count in RSS and cold start.
    for name in ("uni_api.py", "adapters.py", "scheduler.py"):
        compileall.compile_file(str(ROOT / name), quiet=2)
    core = cores()
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="uni-api-bench-"))
    t_start = time.perf_counter()
    try:
        up_port, up_kind = start_upstream(procs, tmp, core["upstream"])
        config = write_config(tmp, up_port)
        log = tmp / "gateway.log"
        colds = []
        for _ in range(cold_runs):
            proc, _, cold = start_gateway(procs, config, core["gateway"], log)
            colds.append(round(cold, 3))
            procs.stop(proc)
        gw, gw_port, cold = start_gateway(procs, config, core["gateway"], log)
        colds.append(round(cold, 3))
        idle = memory_mb(gw.pid)
        use_wrk = shutil.which("wrk") is not None
        cells = []
        for kind in ("nonstream", "stream"):
            for conc in CONCURRENCY:
                runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
                for _ in range(rounds):
                    for target, port, path, pid in (
                            ("direct", up_port, f"/{'json' if kind == 'nonstream' else 'sse'}/v1/chat/completions",
                             None),
                            ("gateway", gw_port, "/v1/chat/completions", gw.pid)):
                        kwargs = dict(port=port, path=path, kind=kind, concurrency=conc, warmup=warmup,
                                      duration=duration, cpu=core["load"], watch_pid=pid)
                        runs[target].append(run_wrk(procs, tmp, **kwargs) if use_wrk and kind == "nonstream"
                                            else run_loadgen(procs, **kwargs))
                direct, gateway = merge(runs["direct"]), merge(runs["gateway"])
                sub = lambda a, b: None if a is None or b is None else round(a - b, 3)  # noqa: E731
                cells.append({
                    "kind": kind, "concurrency": conc, "direct": direct, "gateway": gateway,
                    "added_p50_ms": sub(gateway["p50_ms"], direct["p50_ms"]),
                    "added_p99_ms": sub(gateway["p99_ms"], direct["p99_ms"]),
                    "cpu_ms_per_request": gateway["cpu_ms_per_request"]})
                print(f"  {kind} c{conc}: gateway {gateway['rps']:.0f} req/s, direct {direct['rps']:.0f} req/s",
                      file=sys.stderr, flush=True)
        floor = measure_floor(procs, up_port, core, rounds=rounds, warmup=warmup, duration=duration)
        warm = memory_mb(gw.pid)
        soak = run_loadgen(procs, port=gw_port, path="/v1/chat/completions", kind="nonstream", concurrency=64,
                           warmup=0.0, duration=900.0, cpu=core["load"], watch_pid=None, requests=soak_requests)
        print(f"  memory soak: {soak['requests']} requests at c64, {soak['errors']} errors", file=sys.stderr)
        peak = memory_mb(gw.pid)
        results: dict[str, Any] = {
            "mode": "quick" if args.quick else "default", "upstream": up_kind,
            "loader": "wrk (non-stream) + bench/loadgen.py (stream)" if use_wrk else "bench/loadgen.py (asyncio)",
            "cores": core, "speedups": _speedups(), "python": sys.version.split()[0],
            "cells": cells, "memory_mb": {"idle_rss": idle.get("VmRSS"), "peak_hwm": peak.get("VmHWM"),
                                          "after_cells_rss": warm.get("VmRSS"), "end_rss": peak.get("VmRSS"),
                                          "soak_requests": soak["requests"], "soak_errors": soak["errors"],
                                          "growth": round(peak["VmRSS"] - idle["VmRSS"], 1),
                                          "layers": memory_layers()},
            "cold_start_s": {"runs": colds, "median": statistics.median(colds)},
            "stack_floor": floor, "stream_conversion": stream_microbench(0.3 if args.quick else 1.0),
        }
        if args.profile:
            results["profile"] = profile_gateway(procs, tmp, gw.pid, gw_port, core, 4 if args.quick else 8)
        results["targets"] = judge(results)
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        Path(args.output).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(render(results))
        print(f"\n({results['elapsed_s']} s; results in {args.output})")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def _speedups() -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "uni_api.py"), "--version"], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    return proc.stdout.strip().split("speedups: ")[-1].rstrip(")") or "?"


if __name__ == "__main__":
    sys.exit(main())
