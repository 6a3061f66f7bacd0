"""Statistics, metrics and logs end to end: the real gateway under uvicorn, fake upstreams, SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeUpstream, GatewayServer, chunks, completion

import uni_api

USER = [{"role": "user", "content": "hi"}]
ADMIN_KEY = "sk-admin-0123456789abcdef"
USER_KEY = "sk-user-0123456789abcdef"
OTHER_KEY = "sk-other-0123456789abcdef"
PROVIDER_KEYS = ("sk-up0-secret-0123456789", "sk-up1-secret-0123456789")
SECRETS = (ADMIN_KEY, USER_KEY, OTHER_KEY, *PROVIDER_KEYS)
DAY = 86400.0

# The first schema exactly as version 1 shipped it, written out by hand: the upgrade test must not trust the
# migration table it is testing.
V1_SCHEMA = """
CREATE TABLE requests (id INTEGER PRIMARY KEY, time REAL NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL,
  provider TEXT NOT NULL, upstream_model TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL,
  total_ms REAL NOT NULL, first_byte_ms REAL, prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  client_ip TEXT NOT NULL DEFAULT '');
CREATE TABLE attempts (id INTEGER PRIMARY KEY, time REAL NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
  key_index INTEGER NOT NULL, status INTEGER NOT NULL, ms REAL NOT NULL);
CREATE INDEX requests_time ON requests (time);
CREATE INDEX attempts_time ON attempts (time);
PRAGMA user_version = 1;
"""


def config(*upstreams: FakeUpstream, admin_role: bool = True, cooldown: float = 0) -> dict[str, Any]:
    providers = [{"provider": f"up{i}", "base_url": f"{u.url}/v1/chat/completions", "api": PROVIDER_KEYS[i],
                  "model": [{"up-model": "gpt-4o"}], "preferences": {"cooldown_period": cooldown}}
                 for i, u in enumerate(upstreams)]
    admin = {"api": ADMIN_KEY, **({"role": "admin"} if admin_role else {})}
    return {"providers": providers, "api_keys": [admin, {"api": USER_KEY}, {"api": OTHER_KEY}]}


def start(make_gateway: Any, cfg: dict[str, Any], db: Path | None, **options: Any) -> GatewayServer:
    return make_gateway(cfg, stats_options=uni_api.StatsOptions(str(db) if db else None, **options))


def flush(gw: GatewayServer) -> None:
    gw.server_loop.run(gw.state.stats.flush())


def rows(db: Path, sql: str) -> list[sqlite3.Row]:
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return connection.execute(sql).fetchall()


def chat(gw: GatewayServer, key: str, **body: Any) -> httpx.Response:
    with gw.http(key) as http:
        return http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER, **body})


def sse_payloads(text: str) -> list[Any]:
    return [block[6:] if block == "data: [DONE]" else json.loads(block[6:])
            for block in text.split("\n\n") if block.startswith("data: ")]


def get(gw: GatewayServer, path: str, key: str | None = ADMIN_KEY, **params: Any) -> httpx.Response:
    with gw.http(key) as http:
        return http.get(path, params=params)


# --- Rows per request and per attempt ---


def test_stream_and_non_stream_requests_become_rows_with_upstream_token_counts(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    db = tmp_path / "nested" / "stats.db"  # the folder does not exist yet
    gw = start(make_gateway, config(upstream), db)
    upstream.enqueue(json=completion("hello", usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
                                                     "prompt_tokens_details": {"cached_tokens": 4}}))
    assert chat(gw, USER_KEY).status_code == 200
    upstream.enqueue(sse=chunks(["a", "b", "c"], usage=True))
    streamed = chat(gw, USER_KEY, stream=True)
    assert upstream.received[-1].json["stream_options"] == {"include_usage": True}  # asked upstream for usage
    assert not [p for p in sse_payloads(streamed.text) if isinstance(p, dict) and "usage" in p]  # not the client
    assert sse_payloads(streamed.text)[-1] == "[DONE]"
    flush(gw)
    found = rows(db, "SELECT * FROM requests ORDER BY id")
    assert [(r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"]) for r in found] == [(11, 3, 4), (5, 3, 0)]
    for row in found:
        assert (row["key"], row["model"], row["provider"], row["upstream_model"]) == ("sk-user...", "gpt-4o", "up0",
                                                                                      "up-model")
        assert (row["endpoint"], row["status"], row["attempts"], row["client_ip"]) == (
            "POST /v1/chat/completions", 200, 1, "127.0.0.1")
        assert 0 < row["first_byte_ms"] <= row["total_ms"] < 10_000
        assert re.fullmatch(r"[0-9a-f]{32}", row["request_id"])
    attempts = rows(db, "SELECT * FROM attempts ORDER BY id")
    assert [(a["provider"], a["model"], a["key_index"], a["status"]) for a in attempts] == [
        ("up0", "up-model", 0, 200)] * 2
    assert [a["request_id"] for a in attempts] == [r["request_id"] for r in found]


def test_background_writer_flushes_within_a_second_and_shutdown_writes_the_rest(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    db = tmp_path / "stats.db"
    gw = start(make_gateway, config(upstream), db)
    assert chat(gw, USER_KEY).status_code == 200
    deadline = time.monotonic() + 5
    while not rows(db, "SELECT id FROM requests") and time.monotonic() < deadline:
        time.sleep(0.05)  # real time: the writer's one-second timer is what is under test
    assert len(rows(db, "SELECT id FROM requests")) == 1
    assert chat(gw, USER_KEY).status_code == 200
    gw.stop()
    assert len(rows(db, "SELECT id FROM requests")) == 2


@pytest.mark.anyio
async def test_usage_chunk_reaches_a_client_that_asked_and_is_recorded(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    gw = start(make_gateway, config(upstream), tmp_path / "stats.db")
    upstream.enqueue(sse=chunks(["a", "b"], usage=True))
    async with gw.async_client(USER_KEY) as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=USER, stream=True,
                                                      stream_options={"include_usage": True})
        received = [c async for c in stream]
    assert received[-1].usage is not None and received[-1].usage.completion_tokens == 2
    usage = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
        gw.state.stats.token_usage(0, time.time() + 60, None, None), gw.server_loop.loop))
    assert [(u["total_prompt_tokens"], u["total_completion_tokens"]) for u in usage] == [(5, 2)]


def test_failover_records_every_attempt_and_the_answering_provider(
        make_upstream: Any, make_gateway: Any, tmp_path: Path) -> None:
    first, second = make_upstream(), make_upstream()
    gw = start(make_gateway, config(first, second), tmp_path / "stats.db")
    first.enqueue(status=500, json={"error": {"message": "boom"}})
    assert chat(gw, USER_KEY).status_code == 200
    flush(gw)
    (row,) = rows(tmp_path / "stats.db", "SELECT provider, attempts, status FROM requests")
    assert tuple(row) == ("up1", 2, 200)
    attempts = rows(tmp_path / "stats.db", "SELECT provider, status FROM attempts ORDER BY id")
    assert [tuple(a) for a in attempts] == [("up0", 500), ("up1", 200)]


def test_disable_database_keeps_no_file_and_stats_say_so(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISABLE_DATABASE", "true")
    gw = start(make_gateway, config(upstream), None)
    assert uni_api.StatsOptions.from_env() == uni_api.StatsOptions(None)
    assert chat(gw, USER_KEY).status_code == 200
    answer = get(gw, "/v1/stats")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "stats_disabled"
    assert get(gw, "/v1/token_usage", USER_KEY).status_code == 503
    assert 'uni_api_requests_total{provider="up0",model="gpt-4o",status="200"} 1' in get(gw, "/metrics").text
    assert list(tmp_path.iterdir()) == []


def test_environment_names_the_database_and_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISABLE_DATABASE", "DB_PATH", "STATS_RETENTION_DAYS"):
        monkeypatch.delenv(name, raising=False)
    assert uni_api.StatsOptions.from_env() == uni_api.StatsOptions("./data/stats.db", 30.0)
    monkeypatch.setenv("DB_PATH", "/var/lib/uni-api/s.db")
    monkeypatch.setenv("STATS_RETENTION_DAYS", "7")
    assert uni_api.StatsOptions.from_env() == uni_api.StatsOptions("/var/lib/uni-api/s.db", 7.0)
    monkeypatch.setenv("DISABLE_DATABASE", "TRUE")
    assert uni_api.StatsOptions.from_env().path is None


# --- Retention and schema versions ---


def _insert_request(db: Path, when: float, model: str) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("INSERT INTO requests (time, key, model, provider, upstream_model, endpoint, status,"
                           " total_ms) VALUES (?, 'sk-user...', ?, 'up0', 'up-model', 'POST /v1/chat/completions',"
                           " 200, 1.0)", (when, model))
        connection.execute("INSERT INTO attempts (time, provider, model, key_index, status, ms)"
                           " VALUES (?, 'up0', ?, 0, 200, 1.0)", (when, model))


def test_retention_prunes_old_rows_at_startup(upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    db = tmp_path / "stats.db"
    with sqlite3.connect(db) as connection:
        uni_api.migrate(connection)
    _insert_request(db, time.time() - 31 * DAY, "old")
    _insert_request(db, time.time() - 29 * DAY, "recent")
    start(make_gateway, config(upstream), db, retention_days=30)
    assert [r["model"] for r in rows(db, "SELECT model FROM requests")] == ["recent"]
    assert [r["model"] for r in rows(db, "SELECT model FROM attempts")] == ["recent"]


def test_retention_prunes_by_the_injected_clock(server_loop: Any, tmp_path: Path) -> None:
    db, now = tmp_path / "stats.db", [1_000_000_000.0]
    stats = uni_api.Stats(uni_api.StatsOptions(str(db), retention_days=2), clock=lambda: now[0])
    server_loop.run(stats.start())
    try:
        _insert_request(db, now[0] - 1 * DAY, "a")
        _insert_request(db, now[0], "b")
        server_loop.run(stats.prune())
        assert [r["model"] for r in rows(db, "SELECT model FROM requests ORDER BY id")] == ["a", "b"]
        now[0] += 1.5 * DAY  # "a" is 2.5 days old now, "b" 1.5
        server_loop.run(stats.prune())
        assert [r["model"] for r in rows(db, "SELECT model FROM requests")] == ["b"]
        now[0] += 1 * DAY
        server_loop.run(stats.prune())
        assert rows(db, "SELECT model FROM requests") == []
    finally:
        server_loop.run(stats.close())


def test_version_1_database_is_upgraded_in_place(upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    db = tmp_path / "stats.db"
    with sqlite3.connect(db) as connection:
        connection.executescript(V1_SCHEMA)
    _insert_request(db, time.time() - 60, "from-v1")
    gw = start(make_gateway, config(upstream), db)
    assert rows(db, "PRAGMA user_version")[0][0] == uni_api.SCHEMA_VERSION == 3
    assert chat(gw, USER_KEY).status_code == 200
    flush(gw)
    found = rows(db, "SELECT model, request_id, key_hash, cached_tokens FROM requests ORDER BY id")
    assert [(r["model"], r["request_id"], r["cached_tokens"]) for r in found][0] == ("from-v1", "", 0)
    assert found[1]["model"] == "gpt-4o" and len(found[1]["request_id"]) == 32 and len(found[1]["key_hash"]) == 16
    assert get(gw, "/v1/stats").json()["model_request_counts"] == [{"model": "from-v1", "count": 1},
                                                                   {"model": "gpt-4o", "count": 1}]


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "stats.db"
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(uni_api.StatsError, match="schema version 99 is newer"):
        uni_api.StatsStore(str(db))


def test_an_unwritable_database_path_stops_startup(upstream: FakeUpstream, tmp_path: Path, server_loop: Any) -> None:
    (tmp_path / "file").write_text("not a folder")
    stats = uni_api.Stats(uni_api.StatsOptions(str(tmp_path / "file" / "stats.db")))
    with pytest.raises(uni_api.StatsError, match="cannot open the statistics database"):
        server_loop.run(stats.start())


# --- /v1/stats and /v1/token_usage ---


def test_stats_answer_uni_apis_shape_for_admin_keys_only(
        make_upstream: Any, make_gateway: Any, tmp_path: Path) -> None:
    first, second = make_upstream(), make_upstream()
    gw = start(make_gateway, config(first, second), tmp_path / "stats.db")
    first.enqueue(status=500, json={"error": {"message": "boom"}})
    assert chat(gw, USER_KEY).status_code == 200
    assert chat(gw, OTHER_KEY).status_code == 200
    denied = get(gw, "/v1/stats", USER_KEY)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    stats = get(gw, "/v1/stats", hours=2).json()
    assert stats == {
        "time_range": "Last 2 hours",
        "channel_model_success_rates": [
            {"provider": "up1", "model": "up-model", "success_rate": 1.0, "total_requests": 1},
            {"provider": "up0", "model": "up-model", "success_rate": 0.5, "total_requests": 2}],
        "channel_success_rates": [{"provider": "up1", "success_rate": 1.0, "total_requests": 1},
                                  {"provider": "up0", "success_rate": 0.5, "total_requests": 2}],
        "model_request_counts": [{"model": "gpt-4o", "count": 2}],
        "endpoint_request_counts": [{"endpoint": "POST /v1/chat/completions", "count": 2}],
        "ip_request_counts": [{"ip": "127.0.0.1", "count": 2}],
        "instance": f"{socket.gethostname()}:{os.getpid()}",  # which instance answered (hostname:pid)
    }
    assert get(gw, "/v1/stats", hours="0").status_code == 400


def test_first_key_is_admin_when_no_key_has_the_role(upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    gw = start(make_gateway, config(upstream, admin_role=False), tmp_path / "stats.db")
    assert get(gw, "/v1/stats", ADMIN_KEY).status_code == 200
    assert get(gw, "/v1/stats", USER_KEY).status_code == 403
    assert get(gw, "/v1/stats", None).status_code == 401


def test_token_usage_totals_per_key_over_a_range(upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    db = tmp_path / "stats.db"
    gw = start(make_gateway, config(upstream), db)
    for key in (USER_KEY, USER_KEY, OTHER_KEY):
        assert chat(gw, key).status_code == 200
    _insert_request(db, time.time() - 10 * DAY, "gpt-4o")  # another key's row, ten days ago (no key hash)
    everyone = get(gw, "/v1/token_usage", last_n_days=30).json()
    assert everyone["query_details"]["api_key_filter"] == "all"
    assert [(u["api_key_prefix"], u["request_count"], u["total_prompt_tokens"], u["total_tokens"])
            for u in everyone["usage"]] == [("sk-othe...", 1, 5, 7), ("sk-user...", 1, 0, 0), ("sk-user...", 2, 10, 14)]
    own = get(gw, "/v1/token_usage", USER_KEY).json()
    assert own["query_details"]["api_key_filter"] == "self"
    assert [(u["api_key_prefix"], u["model"], u["request_count"]) for u in own["usage"]] == [
        ("sk-user...", "gpt-4o", 2)]
    recent = get(gw, "/v1/token_usage", last_n_days=5).json()["usage"]
    assert sum(u["request_count"] for u in recent) == 3
    old = get(gw, "/v1/token_usage", start_datetime=uni_api._iso(time.time() - 11 * DAY),
              end_datetime=uni_api._iso(time.time() - 9 * DAY).replace("+00:00", "Z")).json()
    assert [u["request_count"] for u in old["usage"]] == [1]
    assert get(gw, "/v1/token_usage", model="other").json()["usage"] == []
    for bad in ({"last_n_days": "0"}, {"start_datetime": "yesterday"}, {"last_n_days": "3", "end_datetime": "1"},
                {"start_datetime": "2026-01-02", "end_datetime": "2026-01-01"}):
        answer = get(gw, "/v1/token_usage", **bad)
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", bad


# --- /metrics ---


def parse_metrics(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """A small Prometheus text-format parser: TYPE lines and samples; raises on any malformed line."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = sample.fullmatch(line)
        assert match, line
        name, labels, value = match.groups()
        pairs = label.findall(labels or "")
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or ""), line
        samples[(name, frozenset(pairs))] = float(value)
    return types, samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_parse_and_count_requests_tokens_latency_and_cooling(
        make_upstream: Any, make_gateway: Any, tmp_path: Path) -> None:
    first, second = make_upstream(), make_upstream()
    gw = start(make_gateway, config(first, second, cooldown=300), tmp_path / "stats.db")
    first.enqueue(status=500, json={"error": {"message": "boom"}})
    assert chat(gw, USER_KEY).status_code == 200  # up0 fails and cools down, up1 answers
    second.enqueue(sse=chunks(["a", "b"], usage=True))
    assert chat(gw, USER_KEY, stream=True).status_code == 200
    with gw.http(USER_KEY) as http:
        assert http.post("/v1/chat/completions", json={"model": "nope", "messages": USER}).status_code == 404
    assert get(gw, "/metrics", USER_KEY).status_code == 403
    answer = get(gw, "/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    types, samples = parse_metrics(answer.text)
    assert types["uni_api_requests_total"] == "counter" and types["uni_api_request_duration_seconds"] == "histogram"
    assert sample(samples, "uni_api_requests_total", provider="up1", model="gpt-4o", status="200") == 2
    assert sample(samples, "uni_api_requests_total", provider="", model="", status="404") == 1  # no label for "nope"
    assert sample(samples, "uni_api_errors_total", provider="", model="", status="404") == 1
    assert sample(samples, "uni_api_attempts_total", provider="up0", model="up-model", status="500") == 1
    assert sample(samples, "uni_api_tokens_total", provider="up1", model="gpt-4o", kind="prompt") == 10
    assert sample(samples, "uni_api_tokens_total", provider="up1", model="gpt-4o", kind="completion") == 4
    assert sample(samples, "uni_api_channels_cooling") == 1
    labels = {"provider": "up1", "model": "gpt-4o"}
    buckets = [v for (name, ls), v in samples.items()
               if name == "uni_api_request_duration_seconds_bucket" and dict(ls).items() >= labels.items()]
    assert buckets == sorted(buckets) and buckets[-1] == 2
    assert sample(samples, "uni_api_request_duration_seconds_count", **labels) == 2
    assert sample(samples, "uni_api_time_to_first_byte_seconds_count", **labels) == 2
    assert 0 < sample(samples, "uni_api_request_duration_seconds_sum", **labels) < 20


# --- No secret anywhere; request ids; the log line ---


def test_no_key_appears_in_metrics_stats_database_or_logs(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="uni_api")
    db = tmp_path / "stats.db"
    gw = start(make_gateway, config(upstream), db)
    upstream.enqueue(status=401, json={"error": {"message": f"Incorrect API key provided: {PROVIDER_KEYS[0]}"}})
    assert chat(gw, USER_KEY).status_code == 502
    echoed = [{"role": "user", "content": f"my key is {USER_KEY} and {PROVIDER_KEYS[0]}"}]
    upstream.enqueue(json=completion(f"you said {USER_KEY}"))
    assert chat(gw, USER_KEY, messages=echoed).status_code == 200
    assert chat(gw, USER_KEY, stream=True).status_code == 200
    flush(gw)
    exposed = [get(gw, "/metrics").text, get(gw, "/v1/stats").text, get(gw, "/v1/token_usage").text,
               db.read_bytes().decode("latin-1"), caplog.text]
    assert "body:" in caplog.text and "[redacted]" in caplog.text  # DEBUG logged the bodies, redacted
    for text in exposed:
        for secret in SECRETS:
            assert secret not in text


def test_every_answer_carries_a_request_id(upstream: FakeUpstream, make_gateway: Any, tmp_path: Path) -> None:
    gw = start(make_gateway, config(upstream), tmp_path / "stats.db")
    upstream.enqueue(status=503, json={"error": {"message": "down"}})
    with gw.http(USER_KEY) as http:
        answers = [
            http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}),  # every channel failed
            http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}),
            http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER, "stream": True}),
            http.post("/v1/chat/completions", content=b"{"),
            http.get("/v1/models"), http.get("/nowhere"), http.delete("/v1/models"), http.get("/v1/stats"),
        ]
        answers.append(httpx.get(gw.url + "/healthz"))
        answers.append(httpx.get(gw.url + "/v1/models"))
    assert [a.status_code for a in answers] == [503, 200, 200, 400, 200, 404, 405, 403, 200, 401]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)
    with gw.http(USER_KEY) as http:
        kept = http.get("/v1/models", headers={"x-request-id": "trace-42.a:b"}).headers["x-request-id"]
        replaced = http.get("/v1/models", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
    assert kept == "trace-42.a:b" and re.fullmatch(r"[0-9a-f]{32}", replaced)


def test_one_log_line_per_request_names_id_key_prefix_model_provider_status_and_time(
        upstream: FakeUpstream, make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="uni_api")
    gw = start(make_gateway, config(upstream), None)
    answer = chat(gw, USER_KEY)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    assert len(lines) == 1
    assert re.fullmatch(rf"request id={answer.headers['x-request-id']} key=sk-user\.\.\. model=gpt-4o provider=up0 "
                        r"status=200 ms=\d+\.\d attempts=1 tokens=5/2 POST /v1/chat/completions", lines[0])
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]  # bodies only with DEBUG on
