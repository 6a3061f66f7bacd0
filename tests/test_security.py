"""Security: provider keys never leak (responses, error messages, logs at DEBUG, stats rows, metrics), client
keys are compared in constant time, admin endpoints refuse other keys, errors do not echo request bodies,
and a config fetched from a URL is size- and time-limited."""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeUpstream, Reply, chunks, completion, free_port
from gateway_process import gateway_process

import uni_api

KEYS = {"gpt": "sk-proj-SECRETgpt0123456789abcdefXYZ", "claude": "sk-ant-api03-SECRETclaude0123456789abc",
        "gemini": "AIzaSECRETgemini0123456789abcdefXYZ", "dead": "sk-SECRETdead0123456789abcdefghij"}
ADMIN, USER = "sk-admin-0123456789", "sk-user-0123456789"


def leaks(text: str) -> list[str]:
    """The provider keys found in `text`, whole or as a 16-character piece of their middle."""
    return [name for name, key in KEYS.items() if key in text or key[6:22] in text]


def security_config(gpt: FakeUpstream, claude: FakeUpstream, gemini: FakeUpstream, dead_port: int) -> dict[str, Any]:
    def provider(name: str, base_url: str, engine: str) -> dict[str, Any]:
        return {"provider": name, "base_url": base_url, "api": KEYS[name], "engine": engine,
                "model": [{"m-" + name: "m-" + name}, {"shared": "shared"}], "preferences": {"cooldown_period": 0}}

    return {"providers": [provider("dead", f"http://127.0.0.1:{dead_port}/v1/chat/completions", "gpt"),
                          provider("gpt", f"{gpt.url}/v1/chat/completions", "gpt"),
                          provider("claude", f"{claude.url}/v1/messages", "claude"),
                          provider("gemini", f"{gemini.url}/v1beta", "gemini")],
            "api_keys": [{"api": ADMIN, "role": "admin"}, {"api": USER}]}


def echoing_errors() -> list[tuple[str, Reply]]:
    """Upstream answers that quote the provider key back, as real providers do for a bad key."""
    said = {name: f"Incorrect API key provided: {key}. Find your key at ..." for name, key in KEYS.items()}
    mid_stream = [chunks(["a"])[0], {"error": {"message": said["gpt"], "type": "invalid_request_error"}}]
    return [
        ("m-gpt", Reply(status=401, json={"error": {"message": said["gpt"], "code": "invalid_api_key"}})),
        ("m-gpt", Reply(status=400, json={"error": {"message": said["gpt"]}})),
        ("m-gpt", Reply(status=200, body=f"<html>{said['gpt']}</html>".encode(), content_type="text/html")),
        ("m-gpt", Reply(sse=mid_stream)),
        ("m-claude", Reply(status=401, json={"type": "error", "error": {"type": "authentication_error",
                                                                         "message": said["claude"]}})),
        ("m-claude", Reply(status=400, json={"type": "error", "error": {"type": "invalid_request_error",
                                                                         "message": said["claude"]}})),
        ("m-gemini", Reply(status=400, json={"error": {"code": 400, "message": said["gemini"],
                                                       "status": "INVALID_ARGUMENT"}})),
        ("m-gemini", Reply(status=403, json={"error": {"code": 403, "message": said["gemini"]}})),
    ]


def test_provider_keys_never_appear_in_answers_logs_stats_or_metrics(make_upstream: Any, tmp_path: Path) -> None:
    gpt, claude, gemini = make_upstream(), make_upstream(), make_upstream()
    config = security_config(gpt, claude, gemini, free_port())
    seen: list[str] = []
    db = tmp_path / "stats.db"
    with gateway_process(config, tmp_path, DEBUG="true", DB_PATH=str(db), DISABLE_DATABASE="false") as gateway, \
            httpx.Client(base_url=gateway.url, timeout=20, headers={"Authorization": f"Bearer {USER}"}) as http:
        for model, reply in echoing_errors():
            upstream = {"m-gpt": gpt, "m-claude": claude, "m-gemini": gemini}[model]
            upstream.enqueue(reply)
            stream = reply.sse is not None
            response = http.post("/v1/chat/completions", json={"model": model, "stream": stream,
                                                               "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code != 500
            seen.append(response.text + json.dumps(dict(response.headers)))
        gpt.enqueue(Reply(json=completion("fine")))
        response = http.post("/v1/chat/completions", json={"model": "shared", "messages": [{"role": "user",
                                                                                            "content": "hi"}]})
        assert response.json()["choices"][0]["message"]["content"] == "fine"  # after the dead channel failed
        seen.append(response.text)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for path in ("/v1/stats", "/metrics", "/status", "/v1/token_usage", "/v1/models"):
            answer = http.get(path, headers=admin)
            assert answer.status_code == 200, path
            seen.append(answer.text)
        time.sleep(0.3)  # the request log writes its rows in the background
    log = gateway.log()
    assert "DEBUG" in log and "attempt" in log  # the log did run at DEBUG and say what happened
    assert leaks(log) == [], [line for line in log.splitlines() if leaks(line)][:5]
    assert [leaks(text) for text in seen] == [[]] * len(seen), [text for text in seen if leaks(text)][:3]
    if db.exists():
        rows = sqlite3.connect(db).execute("select * from sqlite_master").fetchall()
        dump = "\n".join(sqlite3.connect(db).iterdump())
        assert rows and leaks(dump) == []


def test_client_keys_are_looked_up_by_digest_and_compared_in_constant_time(make_upstream: Any,
                                                                           make_gateway: Any) -> None:
    source = inspect.getsource(uni_api.authenticate) + inspect.getsource(uni_api.find_key)
    assert "keys_by_digest" in source and "hmac.compare_digest" in source  # no early-exit string comparison
    gateway = make_gateway({"providers": [{"provider": "p", "base_url": f"{make_upstream().url}/v1/chat/completions",
                                           "api": "sk-p", "model": ["gpt-4o"]}],
                            "api_keys": [{"api": USER}]})
    near_misses = [USER[:-1] + "x", USER[:-1], USER + "0", USER.upper(), " " + USER + "x"]
    for key in near_misses:
        with gateway.http(key) as http:
            answer = http.get("/v1/models")
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    with gateway.http(USER) as http:
        assert http.get("/v1/models").status_code == 200


@pytest.mark.parametrize("path", ["/v1/stats", "/metrics", "/status"])
def test_admin_endpoints_refuse_user_keys_and_missing_keys(make_upstream: Any, make_gateway: Any, path: str) -> None:
    gateway = make_gateway({"providers": [{"provider": "p", "base_url": f"{make_upstream().url}/v1/chat/completions",
                                           "api": "sk-p", "model": ["gpt-4o"]}],
                            "api_keys": [{"api": ADMIN, "role": "admin"}, {"api": USER}]})
    with gateway.http(USER) as http:
        refused = http.get(path)
    assert refused.status_code == 403 and "error" in refused.json()
    with gateway.http() as http:
        assert http.get(path).status_code == 401
    with gateway.http(ADMIN) as http:
        assert http.get(path).status_code not in (401, 403)  # 503 when the stats database is disabled


@pytest.mark.parametrize("body", [
    {"model": "gpt-4o", "messages": "SECRET-BODY-" + "q" * 5000},
    {"model": "gpt-4o", "messages": [{"role": 7, "content": "SECRET-BODY-" + "q" * 5000}]},
    {"model": "SECRET-BODY-" + "q" * 5000, "messages": [{"role": "user", "content": "hi"}]},
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": "SECRET-BODY-" + "q" * 5000},
])
def test_error_messages_never_echo_the_request_body_whole(make_upstream: Any, make_gateway: Any,
                                                          body: dict[str, Any]) -> None:
    gateway = make_gateway({"providers": [{"provider": "p", "base_url": f"{make_upstream().url}/v1/chat/completions",
                                           "api": "sk-p", "model": ["gpt-4o"]}], "api_keys": [{"api": USER}]})
    with gateway.http(USER) as http:
        answer = http.post("/v1/chat/completions", json=body)
    assert 400 <= answer.status_code < 500
    assert "q" * 1000 not in answer.text and len(answer.content) < 2048


def test_a_config_url_that_stalls_is_given_up_on_in_time(upstream: FakeUpstream) -> None:
    upstream.enqueue(Reply(raw_chunks=[b"providers:\n"] * 100, chunk_delay=0.2, content_type="text/yaml"))
    started = time.monotonic()
    with pytest.raises(uni_api.ConfigError, match="could not fetch the config"):
        asyncio.run(uni_api.fetch_text(f"{upstream.url}/api.yaml", timeout=0.5))
    assert time.monotonic() - started < 2
    assert 0 < uni_api.CONFIG_FETCH_TIMEOUT <= 60 and 0 < uni_api.CONFIG_FETCH_LIMIT <= 16 * 1024 * 1024
