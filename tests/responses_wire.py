"""OpenAI Responses API wire builders for fake upstreams: response objects and their event streams.

Shapes follow OpenAI's API reference ("The response object", "Streaming events") and the OpenAPI spec: every
event carries `type` and a rising `sequence_number`, is framed as `event: <type>` + `data: <json>`, and the stream
ends with its terminal event (no `[DONE]`). `text_events`/`call_events` give one output item's events and the
finished item; `stream_reply` wraps items' events in response.created ... response.completed.
"""

from __future__ import annotations

import json
from typing import Any

from conftest import Reply

USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 17}


def response(status: str = "in_progress", output: list[Any] | None = None, usage: Any = None,
             model: str = "gpt-5-codex", **extra: Any) -> dict[str, Any]:
    return {"id": "resp_fake1", "object": "response", "created_at": 1741476542, "status": status,
            "completed_at": 1741476543 if status == "completed" else None, "error": None,
            "incomplete_details": None, "instructions": None, "max_output_tokens": None, "model": model,
            "output": output or [], "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "user": None, "metadata": {}, **extra}


def message_item(text: str, item_id: str = "msg_fake1", status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def call_item(name: str, arguments: str, call_id: str = "call_fake1", item_id: str = "fc_fake1") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": "completed"}


def text_events(parts: list[str], index: int = 0, item_id: str = "msg_fake1") -> tuple[list[dict[str, Any]], dict]:
    done = message_item("".join(parts), item_id)
    part = done["content"][0]
    where = {"item_id": item_id, "output_index": index, "content_index": 0}
    events = [{"type": "response.output_item.added", "output_index": index,
               "item": {**done, "status": "in_progress", "content": []}},
              {"type": "response.content_part.added", **where, "part": {**part, "text": ""}}]
    events += [{"type": "response.output_text.delta", **where, "delta": p, "logprobs": []} for p in parts]
    events += [{"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []},
               {"type": "response.content_part.done", **where, "part": part},
               {"type": "response.output_item.done", "output_index": index, "item": done}]
    return events, done


def call_events(name: str, parts: list[str], index: int = 0, call_id: str = "call_fake1",
                item_id: str = "fc_fake1") -> tuple[list[dict[str, Any]], dict]:
    done = call_item(name, "".join(parts), call_id, item_id)
    where = {"item_id": item_id, "output_index": index}
    events = [{"type": "response.output_item.added", "output_index": index,
               "item": {**done, "arguments": "", "status": "in_progress"}}]
    events += [{"type": "response.function_call_arguments.delta", **where, "delta": p} for p in parts]
    events += [{"type": "response.function_call_arguments.done", **where, "arguments": done["arguments"]},
               {"type": "response.output_item.done", "output_index": index, "item": done}]
    return events, done


def sse_body(events: list[dict[str, Any]]) -> bytes:
    """Frame events as a Responses stream, numbering them."""
    frames = []
    for number, event in enumerate(events):
        data = {"type": event["type"], "sequence_number": number, **event}
        frames.append(f"event: {event['type']}\ndata: {json.dumps(data)}\n\n")
    return "".join(frames).encode()


def stream_reply(*items: tuple[list[dict[str, Any]], dict], usage: Any = None, terminal: str = "completed",
                 **extra: Any) -> Reply:
    """A whole stream: created, in_progress, each item's events, then the terminal event with the items."""
    events = [{"type": "response.created", "response": response()},
              {"type": "response.in_progress", "response": response()}]
    for item_events, _ in items:
        events += item_events
    final = response(terminal, [item for _, item in items], usage or USAGE, **extra)
    events.append({"type": f"response.{terminal}", "response": final})
    return Reply(raw_chunks=[sse_body(events)])


def json_reply(*items: dict[str, Any], usage: Any = None, status: str = "completed", **extra: Any) -> Reply:
    return Reply(json=response(status, list(items), usage or USAGE, **extra))
