"""Gemini on Vertex AI: same wire format as the Gemini API, another URL, and an OAuth bearer token.

References (Vertex AI REST reference): "projects.locations.publishers.models.generateContent" and
"streamGenerateContent" (URL template, `createTime` in GenerateContentResponse), "Get text embeddings"
(`:predict` with instances[{content}], predictions[].embeddings {values, statistics.token_count}),
"publishers.models.list" (v1beta1), and Google's "Using OAuth 2.0 for Server to Server Applications" for the
token exchange (grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer).
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import openai
import pytest
from conftest import FakeUpstream, GatewayServer, Reply, load_fixture
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from openai_schema import accumulate_stream, validate, validate_chunk, validate_completion

import adapters

FIXTURES = Path(__file__).parent / "fixtures" / "gemini"
load = functools.partial(load_fixture, "gemini")
VERTEX = adapters.ADAPTERS["vertex-gemini"]
EXTRA = {"project_id": "my-project", "region": "us-central1", "client_email": "gw@my-project.iam.gserviceaccount.com"}
MODEL_PATH = "/v1/projects/my-project/locations/us-central1/publishers/google/models"
TOKEN = {"access_token": "ya29.test", "expires_in": 3600, "token_type": "Bearer"}
MakeGateway = Callable[..., GatewayServer]
pytestmark = pytest.mark.anyio


def provider(base_url: str = "https://aiplatform.googleapis.com", **extra: str) -> adapters.Provider:
    return adapters.Provider("v", "vertex-gemini", base_url, extra={**EXTRA, **extra})


def target(model: str = "gemini-2.0-flash", token: str | None = "ya29.test", **kwargs: Any) -> adapters.Target:
    return adapters.Target(kwargs.pop("provider", None) or provider(**kwargs), model, "", token)


# --- Adapter ---


def test_vertex_inherits_gemini_and_overrides_url_and_auth() -> None:
    assert isinstance(VERTEX, adapters.GeminiAdapter)
    assert (VERTEX.auth, VERTEX.default_base_url) == ("google-oauth", "https://aiplatform.googleapis.com")
    assert VERTEX.inline_images and VERTEX.endpoints == {"chat", "embeddings"}


@pytest.mark.parametrize(("base_url", "region", "root"), [
    ("https://aiplatform.googleapis.com", "us-central1", "https://us-central1-aiplatform.googleapis.com"),
    ("https://aiplatform.googleapis.com/", "global", "https://aiplatform.googleapis.com"),
    ("https://europe-west4-aiplatform.googleapis.com", "europe-west4", "https://europe-west4-aiplatform.googleapis.com"),
    ("http://127.0.0.1:9/vertex", "us-central1", "http://127.0.0.1:9/vertex"),  # the user's base_url, as given
])
def test_vertex_url_uses_project_region_and_root(base_url: str, region: str, root: str) -> None:
    request = VERTEX.build_request({"messages": [{"role": "user", "content": "hi"}]},
                                   target(base_url=base_url, region=region))
    assert request.url == (f"{root}/v1/projects/my-project/locations/{region}/publishers/google/models/"
                           "gemini-2.0-flash:generateContent")


def test_vertex_region_defaults_to_global() -> None:
    vertex = adapters.Provider("v", "vertex-gemini", "https://aiplatform.googleapis.com",
                               extra={"project_id": "p"})
    url = VERTEX.build_request({"messages": [], "stream": True}, adapters.Target(vertex, "m", "", "t")).url
    assert url == ("https://aiplatform.googleapis.com/v1/projects/p/locations/global/publishers/google/models/"
                   "m:streamGenerateContent?alt=sse")


def test_vertex_sends_the_gemini_body_with_a_bearer_token() -> None:
    request = VERTEX.build_request(load("text.request.json"), target(provider=adapters.Provider(
        "v", "vertex-gemini", "https://aiplatform.googleapis.com", headers={"X-Trace": "1"}, extra=EXTRA)))
    assert request.headers == {"Authorization": "Bearer ya29.test", "X-Trace": "1"}
    assert request.json == load("text.native.json")
    assert VERTEX.build_request(load("text.request.json"), target(token=None)).headers == {}


def test_vertex_answer_takes_created_from_create_time() -> None:
    answer = VERTEX.parse_response(load("thinking.upstream.json"), "vertex-pro")
    validate_completion(answer)
    assert answer["created"] == 1741944413  # 2025-03-14T09:26:53Z
    assert answer["choices"][0]["message"]["content"] == '{"team": "Argentina", "year": 2022}'


def test_vertex_embeddings_use_predict() -> None:
    request = VERTEX.build_endpoint_request("embeddings", load("embeddings.request.json"),
                                            target("text-embedding-005"))
    assert request.url == ("https://us-central1-aiplatform.googleapis.com" + MODEL_PATH
                           + "/text-embedding-005:predict")
    assert request.json == load("vertex_embeddings.native.json")
    converted = VERTEX.parse_endpoint_response("embeddings", load("vertex_embeddings.upstream.json"), "vertex-embed")
    validate(converted, "CreateEmbeddingResponse")
    assert converted == load("vertex_embeddings.expected.json")
    with pytest.raises(adapters.UpstreamError, match="unexpected shape"):
        VERTEX.parse_endpoint_response("embeddings", {"predictions": [{}]}, "m")


def test_vertex_lists_publisher_models() -> None:
    request = VERTEX.build_models_request(adapters.Target(provider(), ""))
    assert request.url == "https://us-central1-aiplatform.googleapis.com/v1beta1/publishers/google/models?pageSize=1000"
    assert VERTEX.parse_models(load("vertex_models.upstream.json")) == ["gemini-2.0-flash-001", "text-embedding-005"]


# --- End to end: token exchange, then Vertex ---


@pytest.fixture(scope="module")
def service_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def vertex_config(upstream: FakeUpstream, key: rsa.RSAPrivateKey, models: list[Any]) -> dict[str, Any]:
    private_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    return {"providers": [{"provider": "vx", "engine": "vertex-gemini", "base_url": upstream.url, "model": models,
                           "private_key": private_key, "token_uri": f"{upstream.url}/token", **EXTRA}],
            "api_keys": [{"api": "sk-client"}]}


def check_token_request(received: Any, key: rsa.RSAPrivateKey, token_uri: str) -> None:
    """The gateway POSTed a jwt-bearer grant whose assertion the service account's public key verifies."""
    assert (received.method, received.path) == ("POST", "/token")
    form = {k: v[0] for k, v in parse_qs(received.body.decode()).items()}
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    header, claims, signature = form["assertion"].split(".")
    claims_json = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert claims_json["aud"] == token_uri and claims_json["iss"] == EXTRA["client_email"]
    key.public_key().verify(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
                            f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())


def test_gateway_answers_vertex_gemini_with_an_oauth_token(upstream: FakeUpstream, make_gateway: MakeGateway,
                                                           service_key: rsa.RSAPrivateKey) -> None:
    upstream.enqueue(Reply(json=TOKEN))
    upstream.enqueue(Reply(json=load("thinking.upstream.json")))
    gateway = make_gateway(vertex_config(upstream, service_key, [{"gemini-2.5-pro": "vertex-pro"}]))
    answer = gateway.client("sk-client").chat.completions.create(
        model="vertex-pro", messages=[{"role": "user", "content": "Who won the 2022 World Cup?"}])
    validate_completion(answer.model_dump(exclude_unset=True))
    assert answer.choices[0].message.content == '{"team": "Argentina", "year": 2022}'
    assert answer.created == 1741944413
    check_token_request(upstream.received[0], service_key, f"{upstream.url}/token")
    sent = upstream.received[1]
    assert (sent.method, sent.path) == ("POST", f"{MODEL_PATH}/gemini-2.5-pro:generateContent")
    assert sent.headers["Authorization"] == "Bearer ya29.test"
    assert "x-goog-api-key" not in sent.headers


def test_gateway_streams_vertex_and_embeds_with_one_cached_token(upstream: FakeUpstream, make_gateway: MakeGateway,
                                                                 service_key: rsa.RSAPrivateKey) -> None:
    upstream.enqueue(Reply(json=TOKEN))
    upstream.enqueue(Reply(raw_chunks=[(FIXTURES / "parallel.upstream.sse").read_bytes()]))
    upstream.enqueue(Reply(json=load("vertex_embeddings.upstream.json")))
    gateway = make_gateway(vertex_config(upstream, service_key, ["gemini-2.0-flash", "text-embedding-005"]))
    client = gateway.client("sk-client")
    stream = client.chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "party"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = [chunk.model_dump(exclude_unset=True) for chunk in stream]
    for chunk in chunks:
        validate_chunk(chunk)
    folded = accumulate_stream(chunks)
    assert [c["function"]["name"] for c in folded["message"]["tool_calls"]] == [
        "power_disco_ball", "start_music", "dim_lights"]
    assert folded["usage"] == {"prompt_tokens": 105, "completion_tokens": 47, "total_tokens": 152}
    embeddings = client.embeddings.create(model="text-embedding-005", input=["a", "b"])
    assert embeddings.usage.prompt_tokens == 16 and len(embeddings.data) == 2
    assert [(r.path, r.query) for r in upstream.received] == [
        ("/token", {}),
        (f"{MODEL_PATH}/gemini-2.0-flash:streamGenerateContent", {"alt": "sse"}),
        (f"{MODEL_PATH}/text-embedding-005:predict", {}),
    ]
    assert upstream.received[2].json == {"instances": [{"content": "a"}, {"content": "b"}]}
    assert all(r.headers["Authorization"] == "Bearer ya29.test" for r in upstream.received[1:])


def test_gateway_reports_a_failed_token_exchange(upstream: FakeUpstream, make_gateway: MakeGateway,
                                                 service_key: rsa.RSAPrivateKey) -> None:
    upstream.enqueue(Reply(status=400, json={"error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
    gateway = make_gateway(vertex_config(upstream, service_key, ["gemini-2.0-flash"]))
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client("sk-client").chat.completions.create(model="gemini-2.0-flash", messages=[
            {"role": "user", "content": "hi"}])
    assert caught.value.status_code >= 500 and "token" in caught.value.message.lower()
    assert [r.path for r in upstream.received] == ["/token"]
