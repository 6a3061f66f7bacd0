"""Validate gateway answers against OpenAI's published OpenAPI spec (../shared/openai-openapi/openapi.yaml).

`validate_completion(obj)`, `validate_chunk(obj)` and `validate(obj, schema_name)` raise
jsonschema.ValidationError when `obj` does not match the named component schema. The spec uses OpenAPI's
`nullable: true` in places; it is turned into JSON Schema type unions before validating.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The repository's sibling `shared/` (a checkout at /work/main or a worktree further down finds the first one up).
SPEC_PATH = next((parent / "shared" / "openai-openapi" / "openapi.yaml" for parent in Path(__file__).resolve().parents
                  if (parent / "shared" / "openai-openapi" / "openapi.yaml").is_file()),
                 Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.yaml")


def _nullable_to_union(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` as a JSON Schema union with null, applied through the whole tree."""
    if isinstance(node, list):
        return [_nullable_to_union(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_union(value) for key, value in node.items()}
    if node.pop("nullable", False) is not True:
        return node
    if "enum" in node and None not in node["enum"]:
        node["enum"] = [*node["enum"], None]
    if isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
        return node
    if isinstance(node.get("type"), list):
        node["type"] = [*node["type"], "null"] if "null" not in node["type"] else node["type"]
        return node
    return {"anyOf": [node, {"type": "null"}]}


@functools.lru_cache(maxsize=1)
def _components() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC_PATH.open(encoding="utf-8") as stream:
        spec = yaml.load(stream, Loader=loader)  # noqa: S506 (a safe loader)
    return _nullable_to_union(spec["components"])


@functools.cache
def _validator(schema_name: str) -> jsonschema.protocols.Validator:
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    return jsonschema.Draft202012Validator(root)


def validate(obj: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError (the most relevant one) if `obj` does not match `schema_name`."""
    error = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(obj))
    if error is not None:
        raise error


def validate_completion(obj: Any) -> None:
    validate(obj, "CreateChatCompletionResponse")


def validate_chunk(obj: Any) -> None:
    validate(obj, "CreateChatCompletionStreamResponse")


def accumulate_stream(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold `chat.completion.chunk`s into {message, finish_reason, usage} the way a client does.

    Empty text ("" from a role chunk) folds to None, as a non-stream answer without text carries null.
    """
    message: dict[str, Any] = {"role": None, "content": None}
    calls: dict[int, dict[str, Any]] = {}
    finish, usage = None, None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            message["role"] = delta.get("role") or message["role"]
            for key in ("content", "reasoning_content"):
                if delta.get(key) is not None:
                    message[key] = (message.get(key) or "") + delta[key]
            for call in delta.get("tool_calls") or ():
                slot = calls.setdefault(call["index"], {"id": None, "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    message["content"] = message["content"] or None
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"message": message, "finish_reason": finish, "usage": usage}


@functools.lru_cache(maxsize=1)
def _event_schemas() -> dict[str, str]:
    """Streaming event type -> the ResponseStreamEvent member schema that defines it."""
    schemas = _components()["schemas"]
    names = [ref["$ref"].rsplit("/", 1)[-1] for ref in schemas["ResponseStreamEvent"]["anyOf"]]
    return {schemas[name]["properties"]["type"]["enum"][0]: name for name in names}


def validate_response_event(event: dict[str, Any]) -> None:
    """Validate one Responses streaming event against the schema its `type` names."""
    validate(event, _event_schemas()[event["type"]])


def validate_response(obj: Any) -> None:
    validate(obj, "Response")
