"""Vertex OAuth assertion: the service-account JWT (Google, "Using OAuth 2.0 for Server to Server Applications").

RS256 is RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 §3.3, RFC 8017 §8.2). PKCS#1 v1.5 signatures are
deterministic, so the pure-Python signer (for the universal .pex, which has no compiled packages) must give
the very bytes `cryptography` gives, for PKCS#8 ("BEGIN PRIVATE KEY", as in Google's JSON key files) and
PKCS#1 ("BEGIN RSA PRIVATE KEY") keys alike.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters

TOKEN_URI = "https://oauth2.googleapis.com/token"
EMAIL = "gateway@my-project.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey, form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> str:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()).decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode(jwt: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    header, claims, signature = jwt.split(".")
    return (json.loads(b64url_decode(header)), json.loads(b64url_decode(claims)), b64url_decode(signature),
            f"{header}.{claims}".encode())


@pytest.mark.parametrize("form", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL])
def test_pure_signer_matches_cryptography_byte_for_byte(key: rsa.RSAPrivateKey,
                                                        form: serialization.PrivateFormat) -> None:
    text = pem(key, form)
    assert ("BEGIN RSA PRIVATE KEY" in text) is (form == serialization.PrivateFormat.TraditionalOpenSSL)
    for message in (b"", b"header.claims", bytes(range(256)) * 9):
        expected = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        assert adapters.rs256_sign_pure(text, message) == expected
        assert adapters.rs256_sign(text, message) == expected


@settings(max_examples=25, deadline=None)
@given(message=st.binary(max_size=300))
def test_pure_signer_verifies_for_any_message(key: rsa.RSAPrivateKey, message: bytes) -> None:
    signature = adapters.rs256_sign_pure(pem(key), message)
    key.public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())  # raises if wrong


def test_assertion_carries_the_documented_header_and_claims(key: rsa.RSAPrivateKey) -> None:
    jwt = adapters.google_jwt_assertion(EMAIL, pem(key), TOKEN_URI, 1_700_000_000)
    header, claims, signature, signed = decode(jwt)
    assert header == {"alg": "RS256", "typ": "JWT"}
    assert claims == {"iss": EMAIL, "scope": "https://www.googleapis.com/auth/cloud-platform", "aud": TOKEN_URI,
                      "iat": 1_700_000_000, "exp": 1_700_003_600}
    key.public_key().verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    assert "=" not in jwt and "+" not in jwt and "/" not in jwt  # base64url without padding
    assert adapters.GOOGLE_TOKEN_URI == TOKEN_URI


def test_assertion_takes_a_scope_and_a_key_with_escaped_newlines(key: rsa.RSAPrivateKey) -> None:
    escaped = pem(key).replace("\n", "\\n")  # as pasted from the service account's JSON key file
    jwt = adapters.google_jwt_assertion(EMAIL, escaped, "http://127.0.0.1:1/token", 5, scope="s1 s2")
    assert jwt == adapters.google_jwt_assertion(EMAIL, pem(key), "http://127.0.0.1:1/token", 5, scope="s1 s2")
    assert decode(jwt)[1]["scope"] == "s1 s2"


def test_assertion_without_cryptography_is_identical(key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    with_library = adapters.google_jwt_assertion(EMAIL, pem(key), TOKEN_URI, 1_700_000_000)
    for name in ("cryptography.hazmat.primitives", "cryptography.hazmat.primitives.asymmetric"):
        monkeypatch.setitem(sys.modules, name, None)  # `from ... import` now raises ImportError
    assert adapters.google_jwt_assertion(EMAIL, pem(key), TOKEN_URI, 1_700_000_000) == with_library


@pytest.mark.parametrize("bad", [
    "not a key",
    "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
    f"-----BEGIN PRIVATE KEY-----\n{base64.b64encode(bytes.fromhex('3003020100')).decode()}\n-----END PRIVATE KEY-----",
])
def test_a_malformed_key_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        adapters.rs256_sign_pure(bad, b"x")
    with pytest.raises(ValueError):
        adapters.rs256_sign(bad, b"x")
