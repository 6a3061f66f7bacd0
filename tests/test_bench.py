"""The benchmark's own parts (bench/): what it feeds and measures must be real, or its figures mean nothing.

The figures themselves come from `python bench/bench.py`, never from a timed test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FakeUpstream, completion
from starlette.testclient import TestClient

import adapters

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import floor  # noqa: E402

import bench  # noqa: E402


def test_stream_microbench_converts_every_engine_from_its_own_wire_format() -> None:
    results = bench.stream_microbench(budget=0.002)
    assert set(results) == set(adapters.ADAPTERS)
    for engine, entry in results.items():
        assert "skipped" not in entry, (engine, entry)
        assert entry["chunks_out"] > 100, engine
        assert entry["parse_us"] > 0 and entry["full_us"] > 0, engine  # every engine's framing is timed too
    assert results["aws"]["chunks_out"] == results["claude"]["chunks_out"]  # Bedrock frames carry Claude's events


def test_the_stack_floor_app_relays_a_chat_completion_unchanged(upstream: FakeUpstream) -> None:
    upstream.enqueue(json=completion("from upstream"))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(floor.make_app(f"{upstream.url}/v1/chat/completions")) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json() == completion("from upstream")
    assert upstream.received[0].json == body


def test_the_load_generator_stops_after_the_requested_count(upstream: FakeUpstream) -> None:
    port = int(upstream.url.rsplit(":", 1)[1])
    spec = {"host": "127.0.0.1", "port": port, "path": "/v1/chat/completions", "body": {"model": "m"},
            "headers": {}, "concurrency": 4, "warmup": 0.0, "duration": 30.0, "requests": 40, "cpu": None}
    out = subprocess.run([sys.executable, str(BENCH / "loadgen.py"), json.dumps(spec)], capture_output=True,
                         text=True, timeout=20)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["requests"] >= 40 and result["errors"] == 0
    assert result["seconds"] < 5  # the count ended the run, not the 30 s duration


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_memory_layers_add_up_from_the_interpreter_to_the_gateway_modules() -> None:
    rows = bench.memory_layers()
    assert [label for label, _, _ in rows] == [label for label, _ in bench.MEMORY_LAYERS]
    assert rows[0][1] == rows[0][2] > 0
    assert rows[-1][1] == pytest.approx(sum(added for _, _, added in rows), abs=0.2)
    assert rows[-1][1] > rows[2][1] > rows[0][1]  # aiohttp and the rest weigh something


def test_the_slow_stream_client_measures_each_chunks_lag_behind_the_upstream(tmp_path: Path) -> None:
    from conftest import free_port

    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(BENCH / "upstream.py"), str(port)])
    try:
        bench.wait_port(port, upstream)
        spec = {"host": "127.0.0.1", "port": port, "path": "/slow/3/20/v1/chat/completions", "streams": 5,
                "ramp": 0.0, "headers": {}, "body": {"model": "m", "stream": True}}
        out = subprocess.run([sys.executable, str(BENCH / "streams.py"), json.dumps(spec)], capture_output=True,
                             text=True, timeout=20)
    finally:
        upstream.terminate()
        upstream.wait(10)
    result = json.loads(out.stdout.splitlines()[-1])
    assert (result["completed"], result["errors"], result["chunks"]) == (5, 0, 10)  # each stream's first is its ttfb
    assert 0 <= result["p50_lag_ms"] <= result["max_lag_ms"] < 1000
    assert result["max_first_chunk_ms"] > 0


def test_the_capacity_configs_share_state_only_with_a_redis_port(tmp_path: Path) -> None:
    import capacity

    import uni_api

    alone = uni_api.parse_config(capacity.write_config(tmp_path, 1234, None).read_text(), "capacity.yaml")
    shared = uni_api.parse_config(capacity.write_config(tmp_path, 1234, 6399).read_text(), "capacity.yaml")
    assert alone.state is None
    assert shared.state == uni_api.StateOptions("redis://127.0.0.1:6399/0", "bench")
    assert alone.api_keys[0].rate_limits is not None  # both record a rate window, so they compare like for like
    assert alone.providers["bench-slow"].base_url.endswith("/slow/100/100/v1/chat/completions")
