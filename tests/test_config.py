"""parse_config: api.yaml text to frozen records, and one-line errors naming file, line and key path.

Pure and fast: every test calls `uni_api.parse_config(text, "api.yaml")` on a small YAML text.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

import adapters
import uni_api
from scheduler import KeyPool, ModelTable, RateLimit
from uni_api import ApiKey, ConfigError, Rule, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "api.yaml.example"

# A minimal valid config, built from parts so each error case changes one thing. Line numbers:
# 1 providers:  2 - provider: p  3 base_url  4 model  (5.. more provider lines)  then api_keys.
PROVIDER = """\
providers:
  - provider: p
    base_url: https://x.test/v1/chat/completions
    model: [m]
"""
KEY = """\
api_keys:
  - api: sk-a
"""


def parse(text: str) -> uni_api.Config:
    return parse_config(text, "api.yaml")


def error_of(text: str, source: str = "api.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return str(info.value)


# --- api.yaml.example ---


def _example_env_names() -> list[str]:
    return sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", EXAMPLE.read_text())))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _example_env_names():
        monkeypatch.delenv(name, raising=False)


def test_example_config_parses_with_placeholder_defaults(clean_env: None) -> None:
    config = parse_config(EXAMPLE.read_text(), "api.yaml.example")
    assert config.providers["openai"].api_keys == ("sk-replace-me",)
    assert config.providers["groq"].api_keys == ("gsk-replace-me-1", "gsk-replace-me-2")
    assert config.providers["openai"].headers == {"OpenAI-Organization": "org-replace-me"}
    assert [k.token for k in config.api_keys] == ["sk-admin-replace-me", "sk-user-replace-me", "sk-team-replace-me"]
    assert config.api_keys[2].rules == (Rule("key", "sk-user-replace-me", "*"),)


def test_example_config_contains_every_documented_provider_and_key(clean_env: None) -> None:
    text = EXAMPLE.read_text()
    config = parse_config(text, "api.yaml.example")
    documented_providers = re.findall(r"^  - provider: (\S+)", text, re.M)
    documented_keys = re.findall(r"^  - api: \$\{\w+:-(\S+?)\}", text, re.M)
    assert list(config.providers) == documented_providers
    assert [k.token for k in config.api_keys] == documented_keys
    assert {"openai", "openrouter", "azure", "anthropic", "gemini", "vertex", "cohere", "cloudflare"} <= set(
        config.providers)


SCHEMA_KEYS = (
    "provider", "base_url", "api", "model", "tools", "engine", "notes", "proxy", "project_id", "private_key",
    "client_email", "region", "token_uri", "cf_account_id", "api_key_rate_limit", "api_key_cooldown_period",
    "api_key_schedule_algorithm", "model_timeout", "cooldown_period", "headers", "post_body_parameter_overrides",
    "role", "SCHEDULING_ALGORITHM", "AUTO_RETRY", "rate_limit", "ENABLE_MODERATION", "error_triggers",
)


@pytest.mark.parametrize("key", SCHEMA_KEYS)
def test_example_config_documents_every_schema_key(key: str) -> None:
    assert re.search(rf"(^|[\s#-]){re.escape(key)}:", EXAMPLE.read_text(), re.M), f"{key} is not in api.yaml.example"


def test_example_config_documents_every_accepted_key() -> None:
    accepted = {*uni_api._PROVIDER_KEYS, *uni_api._PROVIDER_PREFS, *uni_api._KEY_KEYS, *uni_api._KEY_PREFS,
                *uni_api._GLOBAL_PREFS, *uni_api._STATE_KEYS, "providers", "api_keys", "state"}
    text = EXAMPLE.read_text()
    assert [k for k in sorted(accepted) if not re.search(rf"(^|[\s#-]){re.escape(k)}:", text, re.M)] == []


# --- One error, one line ---

ERRORS: list[tuple[str, str, str]] = [
    # (id, yaml, exact message)
    ("yaml syntax error names the line of the problem",
     "providers:\n  - provider: p\n   base_url: x\n",
     "api.yaml:3: YAML syntax error: expected <block end>, but found '<block mapping start>'"),
    ("yaml unclosed bracket",
     "providers:\n  - provider: [p\napi_keys: []\n",
     None),  # checked by prefix below: the line depends on where the parser gives up
    ("empty file", "", "api.yaml:1: <root>: missing required key 'providers' (a list with at least one provider)"),
    ("root is a list", "- a\n- b\n", "api.yaml:1: <root>: expected a mapping, got a list"),
    ("missing providers", KEY,
     "api.yaml:1: <root>: missing required key 'providers' (a list with at least one provider)"),
    ("empty providers", "providers: []\n" + KEY,
     "api.yaml:1: <root>: missing required key 'providers' (a list with at least one provider)"),
    ("providers is a mapping", "providers:\n  p: x\n" + KEY,
     "api.yaml:1: providers: expected a list, got a mapping"),
    ("missing api_keys", PROVIDER,
     "api.yaml:1: <root>: missing required key 'api_keys' (a list with at least one key)"),
    ("provider entry is not a mapping", "providers:\n  - p\n" + KEY,
     "api.yaml:2: providers[0]: expected a mapping, got a string"),
    ("provider without provider", "providers:\n  - base_url: https://x.test\n" + KEY,
     "api.yaml:2: providers[0]: missing required key 'provider'"),
    ("provider name is a date", "providers:\n  - provider: 2024-01-01\n" + KEY,
     "api.yaml:2: providers[0].provider: expected a string, got a date"),
    ("provider without base_url", "providers:\n  - provider: p\n    model: [m]\n" + KEY,
     "api.yaml:2: providers[0]: missing required key 'base_url'"),
    ("base_url not a URL", "providers:\n  - provider: p\n    base_url: api.openai.com/v1\n" + KEY,
     "api.yaml:3: providers[0].base_url: expected a URL"),
    ("base_url of the third provider",
     PROVIDER + "  - provider: q\n    base_url: https://q.test\n  - provider: r\n    base_url: ftp://r.test\n" + KEY,
     "api.yaml:8: providers[2].base_url: expected a URL"),
    ("api as a mapping", PROVIDER + "    api:\n      key: sk-up\n" + KEY,
     "api.yaml:5: providers[0].api: expected a string or a list, got a mapping"),
    ("model as a string", "providers:\n  - provider: p\n    base_url: https://x.test\n    model: gpt-4o\n" + KEY,
     "api.yaml:4: providers[0].model: expected a list, got a string"),
    ("model entry with two keys",
     "providers:\n  - provider: p\n    base_url: https://x.test\n    model:\n      - {a: b, c: d}\n" + KEY,
     "api.yaml:5: providers[0].model[0]: expected a model name or 'upstream: alias'"),
    ("model alias is not a name",
     "providers:\n  - provider: p\n    base_url: https://x.test\n    model:\n      - m\n      - gpt-4o:\n" + KEY,
     "api.yaml:6: providers[0].model[1]: expected a model name or 'upstream: alias'"),
    ("tools as a string", PROVIDER + "    tools: 'no'\n" + KEY,
     "api.yaml:5: providers[0].tools: expected true or false, got a string"),
    ("engine unknown", PROVIDER + "    engine: nosuch\n" + KEY,
     f"api.yaml:5: providers[0].engine: unknown engine 'nosuch' (known: {', '.join(uni_api.ADAPTERS)})"),
    ("provider cooldown_period negative", PROVIDER + "    preferences:\n      cooldown_period: -1\n" + KEY,
     "api.yaml:6: providers[0].preferences.cooldown_period: expected a number of seconds >= 0"),
    ("global cooldown_period a string", PROVIDER + KEY + "preferences:\n  cooldown_period: 5 minutes\n",
     "api.yaml:8: preferences.cooldown_period: expected a number, got a string"),
    ("api_key_cooldown_period a boolean", PROVIDER + "    preferences:\n      api_key_cooldown_period: true\n" + KEY,
     "api.yaml:6: providers[0].preferences.api_key_cooldown_period: expected a number, got a boolean"),
    ("AUTO_RETRY negative", PROVIDER + KEY + "    preferences:\n      AUTO_RETRY: -1\n",
     "api.yaml:8: api_keys[0].preferences.AUTO_RETRY: expected true, false or a number of retries >= 0"),
    ("AUTO_RETRY maybe", PROVIDER + KEY + "    preferences:\n      AUTO_RETRY: maybe\n",
     "api.yaml:8: api_keys[0].preferences.AUTO_RETRY: expected true, false or a number of retries >= 0"),
    ("AUTO_RETRY fractional", PROVIDER + KEY + "    preferences:\n      AUTO_RETRY: 1.5\n",
     "api.yaml:8: api_keys[0].preferences.AUTO_RETRY: expected true, false or a number of retries >= 0"),
    ("SCHEDULING_ALGORITHM unknown", PROVIDER + KEY + "    preferences:\n      SCHEDULING_ALGORITHM: fastest\n",
     "api.yaml:8: api_keys[0].preferences.SCHEDULING_ALGORITHM: expected one of fixed_priority, round_robin, "
     "weighted_round_robin, lottery, random"),
    ("api_key_schedule_algorithm unknown",
     PROVIDER + "    preferences:\n      api_key_schedule_algorithm: lottery\n" + KEY,
     "api.yaml:6: providers[0].preferences.api_key_schedule_algorithm: expected one of round_robin, random, "
     "fixed_priority"),
    ("global rate limit unparsable", PROVIDER + KEY + "preferences:\n  rate_limit: lots\n",
     "api.yaml:8: preferences.rate_limit: expected a rate limit like 15/min or 15/min,1000/day, got 'lots'"),
    ("per key rate limit unparsable", PROVIDER + KEY + "    preferences:\n      rate_limit: 10/fortnight\n",
     "api.yaml:8: api_keys[0].preferences.rate_limit: expected a rate limit like 15/min or 15/min,1000/day, "
     "got '10/fortnight'"),
    ("per provider rate limit unparsable", PROVIDER + "    preferences:\n      api_key_rate_limit: 0/min\n" + KEY,
     "api.yaml:6: providers[0].preferences.api_key_rate_limit: expected a rate limit like 15/min or "
     "15/min,1000/day, got '0/min'"),
    ("per model rate limit entry unparsable",
     PROVIDER + KEY + "preferences:\n  rate_limit:\n    default: 10/min\n    gpt-4o: 5/min,many/day\n",
     "api.yaml:10: preferences.rate_limit.gpt-4o: expected a rate limit like 15/min or 15/min,1000/day, "
     "got '5/min,many/day'"),
    ("per model rate limit entry a list",
     PROVIDER + KEY + "preferences:\n  rate_limit:\n    gpt-4o: [5/min]\n",
     "api.yaml:9: preferences.rate_limit.gpt-4o: expected a value, got a list"),
    ("global model_timeout zero", PROVIDER + KEY + "preferences:\n  model_timeout: 0\n",
     "api.yaml:8: preferences.model_timeout: expected a number of seconds > 0"),
    ("model_timeout a string", PROVIDER + KEY + "preferences:\n  model_timeout: soon\n",
     "api.yaml:8: preferences.model_timeout: expected a number of seconds > 0"),
    ("provider model_timeout entry negative",
     PROVIDER + "    preferences:\n      model_timeout:\n        default: 10\n        gpt-4o: -5\n" + KEY,
     "api.yaml:8: providers[0].preferences.model_timeout.gpt-4o: expected a number of seconds > 0"),
    ("max_body_size unparsable", PROVIDER + KEY + "preferences:\n  max_body_size: 1.5GB\n",
     "api.yaml:8: preferences.max_body_size: expected a size such as 32MiB or a number of bytes"),
    ("proxy with an unknown scheme", PROVIDER + "    proxy: ftp://proxy.test\n" + KEY,
     "api.yaml:5: providers[0].proxy: expected a proxy URL (http, https, socks4, socks5, socks5h)"),
    ("header value missing", PROVIDER + "    preferences:\n      headers:\n        X-Team:\n" + KEY,
     "api.yaml:7: providers[0].preferences.headers.X-Team: expected a header value (a string), got nothing"),
    ("override entry not a mapping",
     PROVIDER + "    preferences:\n      post_body_parameter_overrides:\n        all: 5\n" + KEY,
     "api.yaml:6: providers[0].preferences.post_body_parameter_overrides: entry 'all' must be a mapping of body "
     "fields"),
    ("rule naming no known provider", PROVIDER + KEY + "    model:\n      - nosuch/*\n",
     "api.yaml:8: api_keys[0].model[0]: 'nosuch' is not a provider or api key of this config"),
    ("rule naming no known provider in a later entry",
     PROVIDER + KEY + "  - api: sk-b\n    model:\n      - p/*\n      - nosuch/*: 3\n",
     "api.yaml:10: api_keys[1].model[1]: 'nosuch' is not a provider or api key of this config"),
    ("duplicate provider names", PROVIDER + "  - provider: p\n    base_url: https://y.test\n" + KEY,
     "api.yaml:5: providers[1].provider: duplicate provider name 'p'"),
    ("duplicate api keys", PROVIDER + KEY + "  - api: sk-b\n  - api: sk-a\n",
     "api.yaml:8: api_keys[2].api: duplicate api key (an earlier api_keys entry has the same one)"),
    ("api key entry without api", PROVIDER + "api_keys:\n  - role: admin\n",
     "api.yaml:6: api_keys[0]: missing required key 'api'"),
    ("api key model a string other than all", PROVIDER + KEY + "    model: gpt-4o\n",
     "api.yaml:7: api_keys[0].model: expected a list of model rules or 'all'"),
    ("rule weight negative", PROVIDER + KEY + "    model:\n      - p/*: -1\n",
     "api.yaml:8: api_keys[0].model[0]: a rule's weight must be a whole number >= 0"),
    ("rule weight a word", PROVIDER + KEY + "    model:\n      - p/*: five\n",
     "api.yaml:8: api_keys[0].model[0]: a rule's weight must be a whole number >= 0"),
    ("rule weight a boolean", PROVIDER + KEY + "    model:\n      - p/*: true\n",
     "api.yaml:8: api_keys[0].model[0]: a rule's weight must be a whole number >= 0"),
    ("rule that is a number", PROVIDER + KEY + "    model:\n      - 5\n",
     "api.yaml:8: api_keys[0].model[0]: expected a model rule such as 'gpt-4o', 'provider/*' or "
     "'provider/model: 5'"),
    ("keys referring to each other in a loop",
     PROVIDER + "api_keys:\n  - api: sk-a\n    model: [sk-b/*]\n  - api: sk-b\n    model: [sk-a/*]\n",
     "api.yaml:5: api_keys: api key rules refer to each other in a loop (sk-a...)"),
    ("key referring to itself", PROVIDER + KEY + "    model:\n      - sk-a/*\n",
     "api.yaml:5: api_keys: api key rules refer to each other in a loop (sk-a...)"),
    ("unknown top-level key", PROVIDER + KEY + "preference:\n  cooldown_period: 5\n",
     "api.yaml:7: preference: unknown key 'preference'"),
    ("unknown provider key", PROVIDER + "    base_ur1: https://x.test\n" + KEY,
     "api.yaml:5: providers[0].base_ur1: unknown key 'base_ur1'"),
    ("unknown provider preference", PROVIDER + "    preferences:\n      cooldown: 5\n" + KEY,
     "api.yaml:6: providers[0].preferences.cooldown: unknown key 'cooldown'"),
    ("unknown api key key", PROVIDER + KEY + "    models: [all]\n",
     "api.yaml:7: api_keys[0].models: unknown key 'models'"),
    ("unknown api key preference", PROVIDER + KEY + "    preferences:\n      AUTO_RETRIES: 2\n",
     "api.yaml:8: api_keys[0].preferences.AUTO_RETRIES: unknown key 'AUTO_RETRIES'"),
    ("unknown global preference", PROVIDER + KEY + "preferences:\n  timeout: 5\n",
     "api.yaml:8: preferences.timeout: unknown key 'timeout'"),
    ("global preference key in a key's preferences", PROVIDER + KEY + "    preferences:\n      model_timeout: 5\n",
     "api.yaml:8: api_keys[0].preferences.model_timeout: unknown key 'model_timeout'"),
    ("unset variable in a provider key", PROVIDER + "    api: ${UNI_API_TEST_UNSET}\n" + KEY,
     "api.yaml:5: providers[0].api: environment variable UNI_API_TEST_UNSET is not set"),
    ("unset variable in a key list",
     PROVIDER + "    api:\n      - sk-up-1\n      - Bearer ${UNI_API_TEST_UNSET}\n" + KEY,
     "api.yaml:7: providers[0].api[1]: environment variable UNI_API_TEST_UNSET is not set"),
    ("unset variable in a header",
     PROVIDER + "    preferences:\n      headers:\n        X-Org: ${UNI_API_TEST_UNSET}\n" + KEY,
     "api.yaml:7: providers[0].preferences.headers.X-Org: environment variable UNI_API_TEST_UNSET is not set"),
    ("unset variable in a client key", PROVIDER + "api_keys:\n  - api: ${UNI_API_TEST_UNSET}\n",
     "api.yaml:6: api_keys[0].api: environment variable UNI_API_TEST_UNSET is not set"),
    ("unset variable in a weighted rule", PROVIDER + KEY + "    model:\n      - ${UNI_API_TEST_UNSET}/*: 2\n",
     "api.yaml:8: api_keys[0].model[0]: environment variable UNI_API_TEST_UNSET is not set"),
    ("state is not a mapping", PROVIDER + KEY + "state: redis://x\n",
     "api.yaml:7: state: expected a mapping, got a string"),
    ("state without redis_url", PROVIDER + KEY + "state:\n  prefix: x\n",
     "api.yaml:8: state: missing required key 'redis_url' (or set REDIS_URL)"),
    ("unknown state key", PROVIDER + KEY + "state:\n  redis_url: redis://h\n  bogus: 1\n",
     "api.yaml:9: state.bogus: unknown key 'bogus'"),
    ("state redis_url not a redis URL", PROVIDER + KEY + "state:\n  redis_url: http://h:6379\n",
     "api.yaml:8: state.redis_url: expected a redis://, rediss:// or unix:// URL"),
    ("state on_error neither open nor closed", PROVIDER + KEY + "state:\n  redis_url: redis://h\n  on_error: maybe\n",
     "api.yaml:9: state.on_error: expected open or closed, got 'maybe'"),
    ("state timeout zero", PROVIDER + KEY + "state:\n  redis_url: redis://h\n  timeout: 0\n",
     "api.yaml:9: state.timeout: expected a number of seconds > 0"),
    ("state prefix empty", PROVIDER + KEY + "state:\n  redis_url: redis://h\n  prefix: ''\n",
     "api.yaml:9: state.prefix: expected a non-empty string"),
]


@pytest.fixture(autouse=True)
def _unset_test_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNI_API_TEST_UNSET", raising=False)


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_a_bad_config_fails_with_one_line_naming_file_line_and_key(text: str, expected: str | None) -> None:
    message = error_of(text)
    assert "\n" not in message
    assert re.match(r"api\.yaml:\d+: ", message), message
    if expected is None:
        assert message.startswith("api.yaml:") and "YAML syntax error" in message
    else:
        assert message == expected


@pytest.mark.skipif(importlib.util.find_spec("aiohttp_socks") is not None, reason="aiohttp-socks is installed")
@pytest.mark.parametrize(("where", "line", "path"), [
    ("provider", 5, "providers[0].proxy"),
    ("provider preferences", 6, "providers[0].preferences.proxy"),
    ("global preferences", 8, "preferences.proxy"),
])
def test_a_socks_proxy_without_aiohttp_socks_is_refused(where: str, line: int, path: str) -> None:
    proxy = "socks5://127.0.0.1:1080"
    text = {"provider": PROVIDER + f"    proxy: {proxy}\n" + KEY,
            "provider preferences": PROVIDER + f"    preferences:\n      proxy: {proxy}\n" + KEY,
            "global preferences": PROVIDER + KEY + f"preferences:\n  proxy: {proxy}\n"}[where]
    assert error_of(text) == (f"api.yaml:{line}: {path}: socks proxies need the optional package aiohttp-socks "
                              "(pip install aiohttp-socks)")


@pytest.mark.skipif(importlib.util.find_spec("aiohttp_socks") is None, reason="aiohttp-socks is not installed")
def test_a_socks_proxy_is_accepted_when_aiohttp_socks_is_installed() -> None:
    config = parse(PROVIDER + "    proxy: socks5://127.0.0.1:1080\n" + KEY)
    assert config.policies["p"].proxy == "socks5://127.0.0.1:1080"


def test_messages_name_a_local_config_by_its_file_name_and_a_url_in_full() -> None:
    text = "providers:\n  - provider: p\n    base_url: nowhere\n" + KEY
    assert error_of(text, "/etc/uni-api/api.yaml") == "api.yaml:3: providers[0].base_url: expected a URL"
    url = "http://127.0.0.1:9/configs/api.yaml"
    assert error_of(text, url) == f"{url}:3: providers[0].base_url: expected a URL"
    assert error_of("providers: [\n", url).startswith(f"{url}:")


# --- ${VAR} and ${VAR:-default} ---
# Semantics, as the shell's: ${VAR:-d} gives d when VAR is unset or empty; ${VAR} gives VAR's value, "" when
# VAR is set but empty, and is a config error when VAR is unset. Expansion happens once: a value taken from
# the environment is never expanded again.

ENV_CONFIG = """\
providers:
  - provider: p
    base_url: ${UNI_API_TEST_HOST:-https://default.test}/v1/chat/completions
    api:
      - ${UNI_API_TEST_KEY}
      - second-${UNI_API_TEST_KEY:-fallback}-key
    model:
      - ${UNI_API_TEST_MODEL:-gpt-4o}: ${UNI_API_TEST_ALIAS:-alias}
    project_id: ${UNI_API_TEST_KEY:-proj}
    preferences:
      headers:
        Authorization: Bearer ${UNI_API_TEST_KEY}
      post_body_parameter_overrides:
        all:
          user: ${UNI_API_TEST_KEY:-anon}
          stop: ["${UNI_API_TEST_KEY:-end}", "fixed"]
api_keys:
  - api: ${UNI_API_TEST_CLIENT:-sk-client}
    model:
      - p/${UNI_API_TEST_ALIAS:-alias}
      - ${UNI_API_TEST_PROVIDER:-p}/*: 3
"""

ENV_NAMES = ("UNI_API_TEST_HOST", "UNI_API_TEST_KEY", "UNI_API_TEST_MODEL", "UNI_API_TEST_ALIAS",
             "UNI_API_TEST_CLIENT", "UNI_API_TEST_PROVIDER")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_variables_that_are_set_are_expanded_in_nested_strings(env: pytest.MonkeyPatch) -> None:
    env.setenv("UNI_API_TEST_HOST", "https://real.test")
    env.setenv("UNI_API_TEST_KEY", "sk-secret")
    env.setenv("UNI_API_TEST_MODEL", "llama")
    env.setenv("UNI_API_TEST_ALIAS", "fast")
    env.setenv("UNI_API_TEST_CLIENT", "sk-mine")
    config = parse(ENV_CONFIG)
    provider = config.providers["p"]
    assert provider.base_url == "https://real.test/v1/chat/completions"
    assert provider.api_keys == ("sk-secret", "second-sk-secret-key")
    assert provider.models == (("fast", "llama"),)
    assert provider.extra == {"project_id": "sk-secret"}
    assert provider.headers == {"Authorization": "Bearer sk-secret"}
    assert provider.overrides == {"all": {"user": "sk-secret", "stop": ["sk-secret", "fixed"]}}
    assert config.api_keys[0].token == "sk-mine"
    assert config.api_keys[0].rules == (Rule("provider", "p", "fast"), Rule("provider", "p", "*", 3))


def test_defaults_are_used_when_variables_are_unset(env: pytest.MonkeyPatch) -> None:
    env.setenv("UNI_API_TEST_KEY", "k")  # ${UNI_API_TEST_KEY} has no default
    config = parse(ENV_CONFIG)
    provider = config.providers["p"]
    assert provider.base_url == "https://default.test/v1/chat/completions"
    assert provider.models == (("alias", "gpt-4o"),)
    assert config.api_keys[0].token == "sk-client"
    assert config.api_keys[0].rules == (Rule("provider", "p", "alias"), Rule("provider", "p", "*", 3))


def test_empty_variables_take_the_default_or_expand_to_nothing(env: pytest.MonkeyPatch) -> None:
    env.setenv("UNI_API_TEST_KEY", "")
    config = parse(ENV_CONFIG)
    provider = config.providers["p"]
    assert provider.api_keys == ("", "second-fallback-key")  # ${VAR} empty -> ""; ${VAR:-d} empty -> d
    assert provider.extra == {"project_id": "proj"}
    assert provider.headers == {"Authorization": "Bearer "}
    assert provider.overrides == {"all": {"user": "anon", "stop": ["end", "fixed"]}}


def test_an_unset_variable_without_default_names_the_variable_and_the_key_path(env: pytest.MonkeyPatch) -> None:
    assert error_of(ENV_CONFIG) == "api.yaml:5: providers[0].api[0]: environment variable UNI_API_TEST_KEY is not set"


def test_values_from_the_environment_are_not_expanded_again(env: pytest.MonkeyPatch) -> None:
    env.setenv("UNI_API_TEST_KEY", "pa${ss}word-${UNI_API_TEST_MODEL}")
    config = parse(PROVIDER + "    api: ${UNI_API_TEST_KEY}\n" + KEY)
    assert config.providers["p"].api_keys == ("pa${ss}word-${UNI_API_TEST_MODEL}",)


TYPED_NAMES = ("UNI_API_TEST_COOL", "UNI_API_TEST_WEIGHT", "UNI_API_TEST_RETRY", "UNI_API_TEST_ON",
               "UNI_API_TEST_TIMEOUT", "UNI_API_TEST_NUMERIC_KEY")


def test_placeholders_give_numbers_and_booleans_where_the_config_wants_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in zip(TYPED_NAMES, ("2.5", "3", "1", "true", "45", "12345"), strict=True):
        monkeypatch.setenv(name, value)
    config = parse(PROVIDER + "    api: ${UNI_API_TEST_NUMERIC_KEY}\n    tools: ${UNI_API_TEST_ON}\n"
                   "    preferences:\n      cooldown_period: ${UNI_API_TEST_COOL}\n"
                   "      model_timeout:\n        default: ${UNI_API_TEST_TIMEOUT}\n"
                   "        m: ${UNI_API_TEST_MISSING:-7}\n"
                   "api_keys:\n  - api: sk-a\n    model:\n      - p/m: ${UNI_API_TEST_WEIGHT}\n"
                   "    preferences:\n      AUTO_RETRY: '${UNI_API_TEST_RETRY}'\n"
                   "      ENABLE_MODERATION: ${UNI_API_TEST_MISSING:-False}\n")
    assert config.providers["p"].api_keys == ("12345",)  # a string where the config wants one, digits or not
    assert config.providers["p"].tools is True
    policy = config.policies["p"]
    assert (policy.cooldown_s, policy.timeouts.default, policy.timeouts.entries["m"]) == (2.5, 45.0, 7.0)
    key = config.api_keys[0]
    assert (key.rules[0].weight, key.retries, key.moderation) == (3, 1, False)


@pytest.mark.parametrize("value", ["soon", "inf", "nan", ""])
def test_a_placeholder_that_spells_no_finite_number_is_refused_where_one_is_needed(
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("UNI_API_TEST_COOL", value)
    text = PROVIDER + "    preferences:\n      cooldown_period: ${UNI_API_TEST_COOL}\n" + KEY
    assert error_of(text) == "api.yaml:6: providers[0].preferences.cooldown_period: expected a number, got a string"


def test_strings_without_placeholders_are_left_alone() -> None:
    config = parse(PROVIDER + "    api: $HOME-{x}-$ {y}-${not a name}\n" + KEY)
    assert config.providers["p"].api_keys == ("$HOME-{x}-$ {y}-${not a name}",)


def test_body_overrides_hold_plain_json_values_whatever_yaml_spelling_made_them() -> None:
    """ruamel gives a ScalarFloat for 0.5 and a ScalarBoolean (an int) for an anchored true: orjson refuses the
    first and would send the second as 1."""
    config = parse(PROVIDER + "    preferences:\n      post_body_parameter_overrides:\n        all:\n"
                   "          temperature: 0.5\n          top_p: &p 0.9\n          again: *p\n"
                   "          stream: &on true\n          store: *on\n          n: 2\n"
                   "          stop: [\"x\", 1.5]\n" + KEY)
    overrides = config.providers["p"].overrides["all"]
    assert overrides == {"temperature": 0.5, "top_p": 0.9, "again": 0.9, "stream": True, "store": True, "n": 2,
                         "stop": ["x", 1.5]}
    assert [type(overrides[k]) for k in ("temperature", "again", "stream", "store", "n")] == [
        float, float, bool, bool, int]
    assert type(overrides["stop"][1]) is float
    sent = json.loads(adapters.dumps(dict(overrides)))  # what an upstream receives, with orjson or json
    assert sent == overrides and sent["store"] is True

# --- Frozen records ---


def test_config_records_are_frozen() -> None:
    config = parse(PROVIDER + "    preferences:\n      headers: {X-A: b}\n"
                   "      post_body_parameter_overrides: {all: {user: u}}\n" + KEY)
    key, provider, policy = config.api_keys[0], config.providers["p"], config.policies["p"]
    for record, attribute, value in [(config, "body_limit", 1), (key, "token", "sk-b"), (key, "role", "admin"),
                                     (provider, "base_url", "https://evil.test"), (provider, "api_keys", ()),
                                     (policy, "cooldown_s", 0.0), (key.rules[0], "weight", 9)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, attribute, value)


def test_mappings_inside_records_are_read_only() -> None:
    config = parse(PROVIDER + "    preferences:\n      headers: {X-A: b}\n"
                   "      post_body_parameter_overrides: {all: {user: u}}\n" + KEY)
    provider = config.providers["p"]
    with pytest.raises(TypeError):
        provider.headers["X-A"] = "c"  # type: ignore[index]
    with pytest.raises(TypeError):
        provider.overrides["all"]["user"] = "v"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.providers["q"] = provider  # type: ignore[index]
    with pytest.raises(TypeError):
        config.policies["p"] = config.policies["p"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.keys_by_digest[b"x"] = config.api_keys[0]  # type: ignore[index]
    assert isinstance(config.api_keys, tuple) and isinstance(config.api_keys[0].rules, tuple)


def test_keys_are_indexed_by_digest_never_by_the_key_itself() -> None:
    config = parse(PROVIDER + KEY + "  - api: sk-b\n")
    assert set(config.keys_by_digest) == {uni_api._digest("sk-a"), uni_api._digest("sk-b")}
    assert config.keys_by_digest[uni_api._digest("sk-b")] is config.api_keys[1]
    assert "sk-a" not in repr(list(config.keys_by_digest))


# --- Providers and models ---


def test_a_provider_is_parsed_with_its_models_and_renames() -> None:
    config = parse("""\
providers:
  - provider: openai
    base_url: https://api.openai.com/v1/chat/completions
    api: [sk-1, sk-2]
    model:
      - gpt-4o
      - gpt-4o-mini: mini
      - "@cf/meta/llama": llama
    tools: false
    notes: anything at all
api_keys:
  - api: sk-a
""")
    provider = config.providers["openai"]
    assert provider.name == "openai"
    assert provider.base_url == "https://api.openai.com/v1/chat/completions"
    assert provider.api_keys == ("sk-1", "sk-2")
    assert provider.models == (("gpt-4o", "gpt-4o"), ("mini", "gpt-4o-mini"), ("llama", "@cf/meta/llama"))
    assert provider.tools is False
    assert provider.engine == "gpt" and provider.engine_forced is False


def test_a_provider_without_model_list_and_without_keys_is_allowed() -> None:
    provider = parse("providers:\n  - provider: p\n    base_url: https://x.test\n" + KEY).providers["p"]
    assert provider.models == () and provider.api_keys == () and provider.tools is True


def test_base_url_is_kept_exactly_as_written() -> None:
    for url in ("http://127.0.0.1:9/v1/chat/completions", "https://aiplatform.googleapis.com",
                "https://api.cloudflare.com/", "https://NAME.openai.azure.com"):
        credentials = "".join(f"    {name}: v\n" for name in uni_api.ADAPTERS[adapters.infer_engine(url)].requires)
        text = f"providers:\n  - provider: p\n    base_url: {url}\n{credentials}" + KEY
        assert parse(text).providers["p"].base_url == url


def test_a_forced_engine_is_recorded() -> None:
    engine = next(iter(uni_api.ADAPTERS))
    provider = parse(PROVIDER + f"    engine: {engine}\n" + KEY).providers["p"]
    assert (provider.engine, provider.engine_forced) == (engine, True)


def test_provider_specific_fields_are_kept_as_strings() -> None:
    provider = parse(PROVIDER + """\
    project_id: my-project
    private_key: "-----BEGIN PRIVATE KEY-----\\nabc\\n-----END PRIVATE KEY-----\\n"
    client_email: sa@my-project.iam.gserviceaccount.com
    region: us-east5
    token_uri: http://127.0.0.1:9/token
    cf_account_id: 12345
    api_version: 2024-10-21
""" + KEY).providers["p"]
    assert provider.extra == {
        "project_id": "my-project", "private_key": "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n",
        "client_email": "sa@my-project.iam.gserviceaccount.com", "region": "us-east5",
        "token_uri": "http://127.0.0.1:9/token", "cf_account_id": "12345", "api_version": "2024-10-21",
    }


# Adapter.requires: each engine names the provider fields it cannot work without, and parse_config (so
# --check-config and a start too) refuses a provider lacking one, where it is written, before any request.
_ENGINE_ONLY = ("providers:\n  - provider: p\n    engine: {engine}\n    base_url: https://x.test\n{fields}"
                "    model: [m]\n" + KEY)
CREDENTIAL_CASES = [
    ("cloudflare without cf_account_id", "cloudflare", "",
     "api.yaml:2: providers[0].cf_account_id: missing required key 'cf_account_id' (engine cloudflare needs it)"),
    ("cloudflare with an empty cf_account_id", "cloudflare", "    cf_account_id: ${UNI_API_TEST_UNSET:-}\n",
     "api.yaml:5: providers[0].cf_account_id: missing required key 'cf_account_id' (engine cloudflare needs it)"),
    ("aws without keys", "aws", "",
     "api.yaml:2: providers[0].aws_access_key: missing required key 'aws_access_key' (engine aws needs it)"),
    ("aws without its secret key", "aws", "    aws_access_key: AKIDEXAMPLE\n",
     "api.yaml:2: providers[0].aws_secret_key: missing required key 'aws_secret_key' (engine aws needs it)"),
    ("vertex-claude without private_key", "vertex-claude", "    project_id: p\n    client_email: a@p.test\n",
     "api.yaml:2: providers[0].private_key: missing required key 'private_key' (engine vertex-claude needs it)"),
    ("vertex-gemini without project_id", "vertex-gemini", "    client_email: a@p.test\n    private_key: k\n",
     "api.yaml:2: providers[0].project_id: missing required key 'project_id' (engine vertex-gemini needs it)"),
]


@pytest.mark.parametrize(("engine", "fields", "expected"), [c[1:] for c in CREDENTIAL_CASES],
                         ids=[c[0] for c in CREDENTIAL_CASES])
def test_a_provider_without_the_credentials_its_engine_needs_fails_at_load(engine: str, fields: str,
                                                                           expected: str) -> None:
    assert error_of(_ENGINE_ONLY.format(engine=engine, fields=fields)) == expected


def test_an_engine_inferred_from_base_url_needs_its_credentials_too() -> None:
    text = "providers:\n  - provider: cf\n    base_url: https://api.cloudflare.com\n    model: [m]\n" + KEY
    assert error_of(text).startswith("api.yaml:2: providers[0].cf_account_id: missing required key")


@pytest.mark.parametrize("engine", sorted(adapters.ADAPTERS))
def test_every_engine_loads_with_the_fields_it_declares(engine: str) -> None:
    fields = "".join(f"    {name}: v\n" for name in adapters.ADAPTERS[engine].requires)
    assert parse(_ENGINE_ONLY.format(engine=engine, fields=fields)).providers["p"].engine == engine


def test_cloudflare_aws_and_vertex_declare_their_credentials() -> None:
    declared = {engine: adapter.requires for engine, adapter in adapters.ADAPTERS.items() if adapter.requires}
    assert declared == {"cloudflare": ("cf_account_id",), "aws": ("aws_access_key", "aws_secret_key"),
                        "vertex-claude": ("project_id", "client_email", "private_key"),
                        "vertex-gemini": ("project_id", "client_email", "private_key")}


def test_values_left_as_the_examples_placeholders_are_listed_with_line_and_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNI_API_TEST_UNSET", raising=False)
    config = parse(PROVIDER + "    api:\n      - sk-real\n      - ${UNI_API_TEST_UNSET:-gsk-replace-me-2}\n"
                   "api_keys:\n  - api: sk-replace-me\n")
    assert config.placeholders == ("api.yaml:7: providers[0].api[1]", "api.yaml:9: api_keys[0].api")
    assert parse(PROVIDER + KEY).placeholders == ()


# --- api_keys rules ---

RULES_CONFIG = """\
providers:
  - provider: gcp1
    base_url: https://g1.test/v1/chat/completions
    model: [gemini-pro, claude: sonnet]
  - provider: openai
    base_url: https://o.test/v1/chat/completions
    model: [gpt-4o]
api_keys:
  - api: sk-admin
    role: admin
  - api: sk-all
    model: all
  - api: sk-user
    model:
      - gpt-4o
      - gcp1/*
      - openai/gpt-4o
      - <anthropic/claude-3.5-sonnet>
      - anthropic/claude-3.5-haiku
      - all
      - gcp1/*: 5
      - openai/gpt-4o: 0
      - sonnet: 2
  - api: sk-team
    model:
      - sk-user/*
      - sk-user/gpt-4o: 4
"""


def test_rules_are_parsed_into_records() -> None:
    config = parse(RULES_CONFIG)
    keys = {k.token: k for k in config.api_keys}
    assert keys["sk-admin"].rules == (Rule("all"),)
    assert keys["sk-admin"].role == "admin"
    assert keys["sk-all"].rules == (Rule("all"),)
    assert keys["sk-all"].role == "user"
    assert keys["sk-user"].rules == (
        Rule("model", model="gpt-4o"),
        Rule("provider", "gcp1", "*"),
        Rule("provider", "openai", "gpt-4o"),
        Rule("model", model="anthropic/claude-3.5-sonnet"),  # <...>: one literal name
        Rule("model", model="anthropic/claude-3.5-haiku"),  # a slash, but no such provider: a model name
        Rule("all"),
        Rule("provider", "gcp1", "*", 5),
        Rule("provider", "openai", "gpt-4o", 0),
        Rule("model", model="sonnet", weight=2),
    )
    assert keys["sk-team"].rules == (Rule("key", "sk-user", "*"), Rule("key", "sk-user", "gpt-4o", 4))


def test_a_key_without_model_list_may_use_every_model() -> None:
    assert parse(PROVIDER + KEY).api_keys[0].rules == (Rule("all"),)


def test_an_empty_model_list_allows_nothing() -> None:
    assert parse(PROVIDER + KEY + "    model: []\n").api_keys[0].rules == ()


def test_a_provider_name_wins_over_a_client_key_of_the_same_name() -> None:
    config = parse(PROVIDER + "api_keys:\n  - api: p\n  - api: sk-b\n    model: [p/*]\n")
    assert config.api_keys[1].rules == (Rule("provider", "p", "*"),)


def test_key_preferences_are_parsed() -> None:
    config = parse(PROVIDER.replace("[m]", "[m, omni-moderation-latest]") + """\
api_keys:
  - api: sk-a
    preferences:
      SCHEDULING_ALGORITHM: weighted_round_robin
      AUTO_RETRY: false
      rate_limit: 60/min,1000/day
      ENABLE_MODERATION: true
  - api: sk-b
    preferences:
      AUTO_RETRY: 2
      rate_limit:
        gpt-4o: 5/min
        default: 100/hour
  - api: sk-c
""")
    a, b, c = config.api_keys
    assert (a.strategy, a.retries, a.moderation) == ("weighted_round_robin", 0, True)
    assert a.rate_limits == ModelTable({}, (RateLimit(60, 60.0), RateLimit(1000, 86400.0)))
    assert b.retries == 2
    assert b.rate_limits == ModelTable({"gpt-4o": (RateLimit(5, 60.0),)}, (RateLimit(100, 3600.0),))
    assert (c.strategy, c.retries, c.moderation, c.rate_limits, c.role) == ("fixed_priority", None, False, None,
                                                                             "user")


@pytest.mark.parametrize("strategy", uni_api.STRATEGY_NAMES)
def test_every_scheduling_algorithm_is_accepted(strategy: str) -> None:
    text = PROVIDER + KEY + f"    preferences:\n      SCHEDULING_ALGORITHM: {strategy}\n"
    assert parse(text).api_keys[0].strategy == strategy


def test_key_labels_never_show_the_whole_key() -> None:
    key = ApiKey("sk-0123456789abcdef", ())
    assert key.label == "sk-0123..." and "89abcdef" not in key.label


# --- Provider and global preferences ---

PREFS_CONFIG = """\
providers:
  - provider: tuned
    base_url: https://t.test/v1/chat/completions
    api: [k1, k2, k3]
    model: [gpt-4o]
    proxy: http://provider-level.test:1
    preferences:
      api_key_schedule_algorithm: fixed_priority
      api_key_cooldown_period: 60
      api_key_rate_limit:
        gpt-4o: 100/min,10000/day
        default: 500/min
      cooldown_period: 0
      model_timeout:
        gpt-4o: 60
        default: 100.5
      proxy: https://preferences-level.test:2
  - provider: plain
    base_url: https://p.test/v1/chat/completions
    api: k
    model: [m]
  - provider: own-proxy
    base_url: https://o.test/v1/chat/completions
    model: [m]
    proxy: http://provider-level.test:1
api_keys:
  - api: sk-a
preferences:
  model_timeout:
    gpt: 30
    default: 90
  cooldown_period: 120
  rate_limit: 100000/day
  error_triggers:
    - The bot's usage is covered by the developer
    - 429
  proxy: http://global.test:3
  max_body_size: 10MB
"""


def test_provider_preferences_are_resolved_into_a_policy() -> None:
    config = parse(PREFS_CONFIG)
    tuned = config.policies["tuned"]
    assert tuned.keys == KeyPool("tuned", 3, "fixed_priority", 60.0, ModelTable(
        {"gpt-4o": (RateLimit(100, 60.0), RateLimit(10000, 86400.0))}, (RateLimit(500, 60.0),)))
    assert tuned.cooldown_s == 0.0  # 0 disables, and wins over the global 120
    assert tuned.timeouts == ModelTable({"gpt-4o": 60.0}, 100.5)
    assert tuned.proxy == "https://preferences-level.test:2"  # preferences.proxy wins over provider-level proxy


def test_providers_without_preferences_inherit_the_global_ones() -> None:
    config = parse(PREFS_CONFIG)
    plain, own = config.policies["plain"], config.policies["own-proxy"]
    assert plain.keys == KeyPool("plain", 1, "round_robin", 0.0, None)
    assert plain.cooldown_s == 120.0
    assert plain.timeouts is None  # resolved per request against config.timeouts
    assert plain.proxy == "http://global.test:3"
    assert own.proxy == "http://provider-level.test:1"
    assert own.keys.size == 0


def test_global_preferences_are_parsed() -> None:
    config = parse(PREFS_CONFIG)
    assert config.timeouts == ModelTable({"gpt": 30.0}, 90.0)
    assert config.rate_limits == ModelTable({}, (RateLimit(100000, 86400.0),))
    assert config.error_triggers == ("The bot's usage is covered by the developer", "429")
    assert config.body_limit == 10_000_000
    assert config.source == "api.yaml"


def test_global_preferences_have_documented_defaults() -> None:
    config = parse(PROVIDER + KEY)
    assert config.timeouts is None and config.rate_limits is None
    assert config.error_triggers == ()
    assert config.body_limit == uni_api.DEFAULT_BODY_LIMIT == 32 * 1024 * 1024
    assert config.default_timeout == uni_api.DEFAULT_TIMEOUT == 100.0
    assert config.policies["p"].cooldown_s == uni_api.DEFAULT_COOLDOWN == 300.0
    assert config.policies["p"].proxy is None


def test_the_default_timeout_comes_from_the_caller() -> None:
    assert parse_config(PROVIDER + KEY, "api.yaml", env_timeout=42.0).default_timeout == 42.0


def test_a_single_timeout_applies_to_every_model() -> None:
    config = parse(PROVIDER + KEY + "preferences:\n  model_timeout: 15\n")
    assert config.timeouts == ModelTable({}, 15.0)


@pytest.mark.parametrize(("written", "size"), [
    ("1024", 1024), ("32MiB", 32 * 1024**2), ("10MB", 10 * 1000**2), ("512kb", 512_000), ("1 GiB", 1024**3),
    ("100b", 100), ('"2048"', 2048),
])
def test_max_body_size_takes_bytes_or_a_unit(written: str, size: int) -> None:
    assert parse(PROVIDER + KEY + f"preferences:\n  max_body_size: {written}\n").body_limit == size


@pytest.mark.parametrize("written", ["-1", "1.5MB", "10 parsecs", "MB", "true"])
def test_max_body_size_refuses_what_it_cannot_read(written: str) -> None:
    message = error_of(PROVIDER + KEY + f"preferences:\n  max_body_size: {written}\n")
    assert message.startswith("api.yaml:8: preferences.max_body_size: expected ")



def test_state_is_off_unless_configured_or_named_by_redis_url() -> None:
    assert parse(PROVIDER + KEY).state is None
    from_env = parse_config(PROVIDER + KEY, "api.yaml", env_redis_url="redis://cache:6379/0").state
    assert from_env == uni_api.StateOptions("redis://cache:6379/0", "uni-api", "open", 0.25)


def test_state_takes_its_url_from_redis_url_when_the_file_gives_none() -> None:
    text = PROVIDER + KEY + "state:\n  prefix: eu\n  on_error: closed\n  timeout: 0.5\n"
    state = parse_config(text, "api.yaml", env_redis_url="rediss://cache:6380").state
    assert state == uni_api.StateOptions("rediss://cache:6380", "eu", "closed", 0.5)
    assert parse_config(PROVIDER + KEY + "state:\n  redis_url: unix:///run/redis.sock\n", "api.yaml",
                        env_redis_url="redis://ignored").state.redis_url == "unix:///run/redis.sock"


def test_the_summary_names_the_shared_state_without_its_password() -> None:
    text = PROVIDER + KEY + "state:\n  redis_url: redis://:hunter2@cache:6379/2\n  prefix: eu\n"
    summary = uni_api.summarize(parse(text))
    assert "shared state: Redis at cache:6379/2, prefix eu, on_error open" in summary
    assert "hunter2" not in summary
