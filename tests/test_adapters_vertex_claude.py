"""Claude on Vertex AI (engine `vertex-claude`): URLs, body envelope, OAuth bearer, end to end with the token flow.

References: Google Cloud "Use Claude models" / "Anthropic Claude models" (rawPredict and streamRawPredict at
`/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}`, `anthropic_version:
vertex-2023-10-16` in the body, no `model`), Vertex AI "Locations" (global and regional endpoints).
The conversion itself is the Anthropic one: tests/fixtures/claude.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeUpstream, GatewayServer, Reply, rsa_pem
from openai_schema import accumulate_stream, validate_chunk, validate_completion

import adapters
from adapters import Provider, Target, UpstreamError

CLAUDE_FIXTURES = Path(__file__).parent / "fixtures" / "claude"
VERTEX = adapters.ADAPTERS["vertex-claude"]
MODEL = "claude-3-5-sonnet-v2@20241022"
USER = {"role": "user", "content": "hi"}


def target(base_url: str = "https://aiplatform.googleapis.com", **extra: str) -> Target:
    provider = Provider("vx", "vertex-claude", base_url, extra={"project_id": "my-project", **extra})
    return Target(provider, MODEL, token="ya29.token")


@pytest.mark.parametrize(("base_url", "region", "stream", "url"), [
    ("https://aiplatform.googleapis.com", "", False,
     "https://aiplatform.googleapis.com/v1/projects/my-project/locations/global/publishers/anthropic/models/"
     f"{MODEL}:rawPredict"),
    ("https://aiplatform.googleapis.com", "us-east5", True,
     "https://us-east5-aiplatform.googleapis.com/v1/projects/my-project/locations/us-east5/publishers/anthropic/"
     f"models/{MODEL}:streamRawPredict"),
    ("https://europe-west1-aiplatform.googleapis.com/", "europe-west1", False,
     "https://europe-west1-aiplatform.googleapis.com/v1/projects/my-project/locations/europe-west1/publishers/"
     f"anthropic/models/{MODEL}:rawPredict"),
    ("http://127.0.0.1:9", "us-east5", True,  # a user-given base_url is honoured as it is
     f"http://127.0.0.1:9/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/{MODEL}:streamRawPredict"),
])
def test_vertex_claude_urls(base_url: str, region: str, stream: bool, url: str) -> None:
    request = VERTEX.build_request({"messages": [USER], "stream": stream}, target(base_url, region=region))
    assert request.url == url and request.stream == stream


def test_vertex_claude_body_carries_the_vertex_version_and_no_model() -> None:
    body = json.loads((CLAUDE_FIXTURES / "tool_use_stream.request.json").read_text())
    request = VERTEX.build_request(body, target())
    native = json.loads((CLAUDE_FIXTURES / "tool_use_stream.native.json").read_text())
    del native["model"]
    assert request.json == {"anthropic_version": "vertex-2023-10-16", **native}
    assert request.headers == {"Authorization": "Bearer ya29.token"}
    assert VERTEX.auth == "google-oauth"


def test_vertex_claude_lists_publisher_model_versions() -> None:
    # REST "publishers.models.list" (v1beta1) with the version view: rawPredict wants `name@versionId`.
    request = VERTEX.build_models_request(target(region="us-east5"))
    assert request.url == ("https://us-east5-aiplatform.googleapis.com/v1beta1/publishers/anthropic/models"
                           "?pageSize=1000&view=PUBLISHER_MODEL_VERSION_VIEW_BASIC")
    assert request.headers == {"Authorization": "Bearer ya29.token"}
    listing = {"publisherModels": [
        {"name": "publishers/anthropic/models/claude-3-5-sonnet-v2", "versionId": "20241022"},
        {"name": "publishers/anthropic/models/claude-3-haiku"}]}
    assert VERTEX.parse_models(listing) == ["claude-3-5-sonnet-v2@20241022", "claude-3-haiku"]
    with pytest.raises(UpstreamError):
        VERTEX.parse_models({"models": []})


def test_vertex_claude_engine_is_inferred_for_claude_models_on_aiplatform() -> None:
    assert adapters.infer_engine("https://us-east5-aiplatform.googleapis.com", MODEL) == "vertex-claude"


# --- End to end through the gateway, with the service-account token exchange ---

MakeGateway = Callable[..., GatewayServer]


@pytest.fixture(scope="module")
def private_key() -> str:
    return rsa_pem(2048)


def vertex_config(upstream: FakeUpstream, private_key: str) -> dict[str, Any]:
    vertex = {"provider": "vx", "base_url": upstream.url, "engine": "vertex-claude", "project_id": "my-project",
              "region": "us-east5", "client_email": "gateway@my-project.iam.gserviceaccount.com",
              "private_key": private_key, "token_uri": f"{upstream.url}/token", "model": [{MODEL: "claude-sonnet"}]}
    return {"providers": [vertex], "api_keys": [{"api": "sk-client"}]}


TOKEN = Reply(json={"access_token": "ya29.from-exchange", "expires_in": 3599, "token_type": "Bearer"})


def test_vertex_claude_without_model_list_discovers_models_with_the_token(
        upstream: FakeUpstream, make_gateway: MakeGateway, private_key: str) -> None:
    config = vertex_config(upstream, private_key)
    del config["providers"][0]["model"]
    upstream.enqueue(TOKEN)
    upstream.enqueue(Reply(json={"publisherModels": [
        {"name": "publishers/anthropic/models/claude-3-5-sonnet-v2", "versionId": "20241022"}]}))
    gateway = make_gateway(config)
    assert [m.id for m in gateway.client("sk-client").models.list()] == ["claude-3-5-sonnet-v2@20241022"]
    token_request, listing = upstream.received
    assert token_request.path == "/token" and listing.path == "/v1beta1/publishers/anthropic/models"
    assert listing.headers["Authorization"] == "Bearer ya29.from-exchange"


def test_gateway_answers_vertex_claude_with_an_exchanged_token(upstream: FakeUpstream, make_gateway: MakeGateway,
                                                               private_key: str) -> None:
    upstream.enqueue(TOKEN)
    upstream.enqueue(Reply(json=json.loads((CLAUDE_FIXTURES / "basic.upstream.json").read_text())))
    gateway = make_gateway(vertex_config(upstream, private_key))
    answer = gateway.client("sk-client").chat.completions.create(model="claude-sonnet", messages=[USER])
    validate_completion(answer.model_dump(exclude_unset=True))
    assert answer.choices[0].message.content == "Hi! My name is Claude."
    token_request, call = upstream.received
    assert token_request.path == "/token"
    assert call.path == f"/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/{MODEL}:rawPredict"
    assert call.headers["Authorization"] == "Bearer ya29.from-exchange"
    assert call.json["anthropic_version"] == "vertex-2023-10-16" and "model" not in call.json


def test_gateway_streams_vertex_claude(upstream: FakeUpstream, make_gateway: MakeGateway, private_key: str) -> None:
    raw = (CLAUDE_FIXTURES / "thinking_stream.upstream.sse").read_bytes()
    upstream.enqueue(TOKEN)
    upstream.enqueue(Reply(raw_chunks=[raw[i:i + 40] for i in range(0, len(raw), 40)]))
    gateway = make_gateway(vertex_config(upstream, private_key))
    stream = gateway.client("sk-client").chat.completions.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "What is 27 * 453?"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk.model_dump(exclude_unset=True) for chunk in stream]
    for chunk in chunks:
        validate_chunk(chunk)
    folded = accumulate_stream(chunks)
    assert folded["message"]["content"] == "27 * 453 = 12,231" and folded["finish_reason"] == "stop"
    assert folded["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert upstream.received[1].path.endswith(f"/models/{MODEL}:streamRawPredict")
    assert upstream.received[1].json["stream"] is True
