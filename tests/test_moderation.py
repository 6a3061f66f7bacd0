"""ENABLE_MODERATION end to end: the real gateway, a fake OpenAI-format upstream serving chat and moderations.

The moderation call is routed like any request of the key (its rules must reach omni-moderation-latest or
text-moderation-latest); a key whose rules reach neither is refused at config load, or at startup when
only model discovery could have supplied one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import FakeUpstream, free_port, to_yaml
from test_cli import ROOT, SCRIPT, cli_env

import adapters
import uni_api

KEY = "sk-client"


def moderation_answer(*flagged: str, model: str = "omni-moderation-latest") -> dict[str, Any]:
    """An OpenAI moderation object as the API reference shows it."""
    names = ("harassment", "hate", "self-harm", "sexual", "violence")
    return {"id": "modr-1", "model": model, "results": [{
        "flagged": bool(flagged),
        "categories": {name: name in flagged for name in names},
        "category_scores": {name: 0.9 if name in flagged else 0.01 for name in names}}]}


def config(upstream: FakeUpstream, models: list[str] | None = None, rules: list[str] | None = None,
           **prefs: Any) -> dict[str, Any]:
    provider: dict[str, Any] = {"provider": "up", "base_url": f"{upstream.url}/v1/chat/completions",
                                "api": "sk-up-secret", "preferences": {"cooldown_period": 0}}
    if models is not None:
        provider["model"] = models
    key: dict[str, Any] = {"api": KEY, "model": rules or ["all"],
                           "preferences": {"ENABLE_MODERATION": True, **prefs}}
    return {"providers": [provider], "api_keys": [key]}


def paths(upstream: FakeUpstream) -> list[str]:
    return [r.path for r in upstream.received]


DEFAULT_MODELS = ["gpt-4o", "omni-moderation-latest"]


# --- Requests ---


def test_flagged_last_user_message_is_refused_with_the_flagged_categories(upstream: FakeUpstream,
                                                                           make_gateway) -> None:
    gw = make_gateway(config(upstream, DEFAULT_MODELS))
    upstream.enqueue(json=moderation_answer("harassment", "violence"))
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client(KEY).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "bad words"}])
    assert caught.value.status_code == 400
    assert caught.value.code == "content_policy_violation"
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["message"] == "The request was rejected by moderation; flagged categories: harassment, violence."
    assert paths(upstream) == ["/v1/moderations"]  # the chat model never saw the text
    assert upstream.received[0].json == {"model": "omni-moderation-latest", "input": "bad words"}
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-up-secret"


def test_unflagged_message_is_answered_after_the_check(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config(upstream, DEFAULT_MODELS))
    upstream.enqueue(json=moderation_answer())
    answer = gw.client(KEY).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "echo: hi"
    assert paths(upstream) == ["/v1/moderations", "/v1/chat/completions"]


def test_flagged_stream_request_is_refused_before_any_chunk(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config(upstream, DEFAULT_MODELS))
    upstream.enqueue(json=moderation_answer("hate"))
    with gw.http(KEY) as http:
        response = http.post("/v1/chat/completions", json={
            "model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "content_policy_violation"
    assert "hate" in response.json()["error"]["message"]


def test_only_the_text_of_the_last_user_message_is_checked(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config(upstream, DEFAULT_MODELS))
    upstream.enqueue(json=moderation_answer())
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": "look at"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                                             {"type": "text", "text": "this"}]}]
    with gw.http(KEY) as http:
        assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": messages}).status_code == 200
    assert upstream.received[0].json["input"] == "look at\nthis"


def test_text_moderation_latest_serves_when_omni_is_not_reachable(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config(upstream, ["gpt-4o", "text-moderation-latest", "omni-moderation-latest"],
                             rules=["gpt-4o", "text-moderation-latest"]))
    upstream.enqueue(json=moderation_answer("sexual", model="text-moderation-latest"))
    with gw.http(KEY) as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "x"}]})
    assert response.status_code == 400 and "sexual" in response.json()["error"]["message"]
    assert upstream.received[0].json["model"] == "text-moderation-latest"


def test_key_without_moderation_sends_no_moderation_request(upstream: FakeUpstream, make_gateway) -> None:
    plain = config(upstream, DEFAULT_MODELS)
    plain["api_keys"][0]["preferences"] = {"ENABLE_MODERATION": False}
    gw = make_gateway(plain)
    gw.client(KEY).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert paths(upstream) == ["/v1/chat/completions"]


def test_the_check_takes_no_rate_limit_slot_of_its_own(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config(upstream, DEFAULT_MODELS, rate_limit="1/min"))
    upstream.enqueue(json=moderation_answer())
    client = gw.client(KEY)
    assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert paths(upstream) == ["/v1/moderations", "/v1/chat/completions"]  # the refused one cost no check


def test_a_failing_moderation_model_fails_the_request_closed(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config(upstream, DEFAULT_MODELS))
    upstream.enqueue(status=500, json={"error": {"message": "moderation is down"}})
    with gw.http(KEY) as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "hi"}]})
    assert response.status_code == 502
    assert "omni-moderation-latest" in response.json()["error"]["message"]
    assert paths(upstream) == ["/v1/moderations"]


def test_an_unreadable_moderation_answer_fails_the_request_closed(upstream: FakeUpstream, make_gateway) -> None:
    gw = make_gateway(config(upstream, DEFAULT_MODELS))
    upstream.enqueue(json={"object": "something else"})
    with gw.http(KEY) as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "hi"}]})
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "The moderation model's answer could not be read."


def test_a_discovered_moderation_model_satisfies_the_startup_check(upstream: FakeUpstream, make_gateway) -> None:
    upstream.models = ["gpt-4o", "omni-moderation-latest"]
    gw = make_gateway(config(upstream))  # no model list: discovered at startup
    upstream.enqueue(json=moderation_answer("violence"))
    with gw.http(KEY) as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "content_policy_violation"


# --- Config errors ---


def test_config_load_refuses_a_moderated_key_that_reaches_no_moderation_model(upstream: FakeUpstream) -> None:
    text = to_yaml(config(upstream, DEFAULT_MODELS, rules=["gpt-4o"]))
    with pytest.raises(uni_api.ConfigError) as caught:
        uni_api.parse_config(text, "api.yaml")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "ENABLE_MODERATION" in row)
    assert str(caught.value) == (
        f"api.yaml:{line}: api_keys[0].preferences.ENABLE_MODERATION: moderation is on but this key's model "
        "rules reach no moderation model (omni-moderation-latest or text-moderation-latest)")


def test_startup_exits_non_zero_when_discovered_models_hold_no_moderation_model(upstream: FakeUpstream,
                                                                               tmp_path: Path) -> None:
    (tmp_path / "api.yaml").write_text(to_yaml(config(upstream)))  # discovery finds only up-model
    args = ["--config", str(tmp_path / "api.yaml"), "--host", "127.0.0.1", "--port", str(free_port())]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=cli_env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == uni_api.STARTUP_FAILURE
    line = "error: api.yaml: api_keys[0].preferences.ENABLE_MODERATION: moderation is on but this key's model rules"
    assert any(row.endswith(line + " reach no moderation model (omni-moderation-latest or text-moderation-latest)")
               for row in result.stderr.splitlines()), result.stderr


def test_moderation_for_unknown_user_text_is_skipped() -> None:
    chat = adapters.FACES["chat"]
    turns = [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]
    assert chat.user_text({"messages": turns}) == ""
    assert chat.user_text({"messages": [{"role": "system", "content": "s"}]}) == ""
    assert uni_api.flagged_categories(b'{"results": [{"flagged": true, "categories": {}}]}') == ["unspecified"]
    assert uni_api.flagged_categories(b'{"results": [{"flagged": false, "categories": {"hate": true}}]}') == []
