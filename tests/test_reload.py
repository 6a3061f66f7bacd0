"""Config hot reload: a changed file (polled) or SIGHUP swaps the config; requests in flight keep theirs.

In-process gateways poll their tmp config every 20 ms (create_app's `poll_seconds`); SIGHUP is tested on a
real `python uni_api.py` process, the only place a signal handler can be installed (the main thread).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from conftest import FakeUpstream, Reply, free_port, simple_config, to_yaml
from test_cli import ROOT, SCRIPT, cli_env

T = TypeVar("T")
KEY = "sk-client"
USER = [{"role": "user", "content": "hi"}]
POLL = 0.02


def eventually(check: Callable[[], T], timeout: float = 5.0) -> T:
    """The first truthy result of `check`, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.01)
    return result


def write(path: Path, config: dict[str, Any] | str) -> None:
    """Replace the file in one step, as editors do: written in place, a 20 ms poll can catch it empty."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(config if isinstance(config, str) else to_yaml(config))
    os.replace(temporary, path)


def model_ids(http: httpx.Client) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def start(make_gateway: Callable[..., Any], path: Path, config: dict[str, Any]) -> Any:
    write(path, config)
    return make_gateway(config, source=str(path), poll_seconds=POLL)


def test_a_changed_file_is_served_without_a_restart(upstream: FakeUpstream, make_gateway, tmp_path: Path) -> None:
    path = tmp_path / "api.yaml"
    gw = start(make_gateway, path, simple_config(upstream, models=["gpt-4o"]))
    first = gw.state
    write(path, simple_config(upstream, models=["gpt-4o", "gpt-4o-mini"]))
    with gw.http(KEY) as http:
        eventually(lambda: model_ids(http) == ["gpt-4o", "gpt-4o-mini"])
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": USER}).status_code == 200
    assert gw.state is not first and gw.state.scheduler is first.scheduler
    assert gw.state.config.source == str(path)


def test_an_invalid_file_keeps_the_running_config_and_logs_one_line(
        upstream: FakeUpstream, make_gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="uni_api")
    path = tmp_path / "broken.yaml"
    gw = start(make_gateway, path, simple_config(upstream, models=["gpt-4o"]))
    write(path, "providers:\n  - provider: p\n    base_url: not-a-url\napi_keys:\n  - api: sk-a\n")
    failed = eventually(lambda: [r for r in caplog.records if "reload failed" in r.getMessage()])
    assert [r.getMessage() for r in failed] == [
        "config reload failed, the running config stays: broken.yaml:3: providers[0].base_url: expected a URL"]
    assert failed[0].levelno == logging.ERROR and failed[0].exc_info is None  # one line, no traceback
    with gw.http(KEY) as http:
        assert model_ids(http) == ["gpt-4o"]
        write(path, simple_config(upstream, models=["gpt-4o", "fixed"]))
        eventually(lambda: model_ids(http) == ["gpt-4o", "fixed"])
    assert len([r for r in caplog.records if "reload failed" in r.getMessage()]) == 1  # logged once, not per poll


def test_a_request_in_flight_finishes_on_the_config_it_started_with(make_upstream, make_gateway,
                                                                   tmp_path: Path) -> None:
    slow, spare, new = make_upstream(), make_upstream(), make_upstream()
    path = tmp_path / "api.yaml"
    gw = start(make_gateway, path, simple_config(slow, spare))  # up0 then up1, fixed priority
    slow.enqueue(Reply(status=500, json={"error": {"message": "down"}}, delay=0.5))
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(gw.http(KEY).post(
        "/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})))
    worker.start()
    eventually(lambda: slow.received)
    write(path, simple_config(new))  # the new config has neither up0's upstream nor up1
    eventually(lambda: gw.state.config.providers["up0"].base_url.startswith(new.url))
    worker.join(10)
    assert answers[0].status_code == 200, answers[0].text  # failed over to up1 of the old config
    assert len(spare.received) == 1 and not new.received
    with gw.http(KEY) as http:
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}).status_code == 200
    assert len(new.received) == 1 and len(spare.received) == 1


def test_a_cooling_channel_stays_cooled_across_a_reload(make_upstream, make_gateway, tmp_path: Path) -> None:
    failing, healthy = make_upstream(), make_upstream()
    config = simple_config(failing, healthy)
    config["providers"][0]["preferences"]["cooldown_period"] = 600
    path = tmp_path / "api.yaml"
    gw = start(make_gateway, path, config)
    failing.enqueue(status=500, json={"error": {"message": "down"}})
    with gw.http(KEY) as http:
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}).status_code == 200
        old = gw.state
        config["providers"][1]["model"] = ["gpt-4o", "extra"]  # up1 changes; up0's channel does not
        write(path, config)
        eventually(lambda: gw.state is not old)
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}).status_code == 200
    assert len(failing.received) == 1  # still cooling: not tried again after the reload
    assert len(healthy.received) == 2


def test_a_client_rate_window_carries_over_a_reload(upstream: FakeUpstream, make_gateway, tmp_path: Path) -> None:
    config = simple_config(upstream, rate_limit="2/min")
    path = tmp_path / "api.yaml"
    gw = start(make_gateway, path, config)
    with gw.http(KEY) as http:
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}).status_code == 200
        old = gw.state
        config["providers"][0]["model"] = ["gpt-4o", "other"]
        write(path, config)
        eventually(lambda: gw.state is not old)
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}).status_code == 200
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}).status_code == 429


def test_model_discovery_reruns_on_reload(upstream: FakeUpstream, make_gateway, tmp_path: Path) -> None:
    config = simple_config(upstream)
    del config["providers"][0]["model"]
    upstream.models = ["first"]
    path = tmp_path / "api.yaml"
    gw = start(make_gateway, path, config)
    with gw.http(KEY) as http:
        assert model_ids(http) == ["first"]
        upstream.models = ["first", "second"]
        old = gw.state
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # same text, new mtime
        eventually(lambda: gw.state is not old)
        assert model_ids(http) == ["first", "second"]


def test_a_reload_that_breaks_moderation_keeps_the_running_config(
        upstream: FakeUpstream, make_gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="uni_api")
    config = simple_config(upstream, models=["gpt-4o", "omni-moderation-latest"], ENABLE_MODERATION=True)
    path = tmp_path / "api.yaml"
    gw = start(make_gateway, path, config)
    config["providers"][0]["model"] = ["gpt-4o"]
    write(path, config)
    failed = eventually(lambda: [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()])
    assert "api_keys[0].preferences.ENABLE_MODERATION: moderation is on" in failed[0]
    with gw.http(KEY) as http:
        assert model_ids(http) == ["gpt-4o", "omni-moderation-latest"]


def test_without_a_source_nothing_is_watched(upstream: FakeUpstream, make_gateway, tmp_path: Path) -> None:
    path = tmp_path / "api.yaml"
    write(path, simple_config(upstream, models=["gpt-4o"]))
    gw = make_gateway(simple_config(upstream, models=["gpt-4o"]), poll_seconds=POLL)
    first = gw.state
    write(path, simple_config(upstream, models=["other"]))
    time.sleep(10 * POLL)  # proving a negative: ten poll periods pass without a reload
    assert gw.state is first


# --- SIGHUP, on a real process ---


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_reloads_a_config_served_from_a_url(upstream: FakeUpstream, tmp_path: Path) -> None:
    def config_text(models: list[str]) -> str:
        return to_yaml({"providers": [{"provider": "p", "base_url": "http://127.0.0.1:9/v1/chat/completions",
                                       "model": models}], "api_keys": [{"api": KEY}]})

    upstream.enqueue(body=config_text(["before"]).encode(), content_type="text/yaml")
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--config", f"{upstream.url}/api.yaml",
                                    "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=cli_env(),
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=2) as http:
            def models() -> list[str] | None:
                assert process.poll() is None, log.read_text()
                try:
                    return model_ids(http)
                except httpx.TransportError:
                    return None

            assert eventually(models, timeout=10) == ["before"]
            upstream.enqueue(body=config_text(["after"]).encode(), content_type="text/yaml")
            process.send_signal(signal.SIGHUP)
            eventually(lambda: models() == ["after"])
        assert [r.path for r in upstream.received] == ["/api.yaml", "/api.yaml"]
    finally:
        process.terminate()
        process.wait(5)
    assert "config reloaded from" in log.read_text()
