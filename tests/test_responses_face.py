"""The OpenAI Responses face, pure parts: request checks, input items -> chat requests, chat answers and chunks ->
response objects and "Streaming events", each event and object validated against ../shared/openai-openapi
(schemas CreateResponse, Response, Response*Event).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai_schema import validate, validate_response, validate_response_event

import adapters

FACE = adapters.ResponsesFace()
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
SIGNED = [{"type": "thinking", "thinking": "Look it up.", "signature": "sig-1"}]


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m", **extra,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(prompt: int = 9, completion: int = 4, cached: int = 3, reasoning: int = 2) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
             "prompt_tokens_details": {"cached_tokens": cached},
             "completion_tokens_details": {"reasoning_tokens": reasoning}}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
            "choices": [], "usage": usage}


def completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return adapters.build_completion("m", 1700000000, message, finish, adapters.build_usage(9, 4, cached=3))


def run_stream(body: dict[str, Any], chunks: list[dict[str, Any]], fail: tuple[str, int] | None = None
               ) -> list[dict[str, Any]]:
    """Every frame of a stream, checked for OpenAI's `event:` + `data:` framing, each event against its schema."""
    stream = FACE.stream(body, "alias")
    frames = [frame for c in chunks for frame in stream.on_chunk(c)]
    frames += stream.fail(*fail) if fail else stream.end()
    events = []
    for frame in frames:
        head, data = frame.decode().removesuffix("\n\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        validate_response_event(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# --- validate ---


def test_a_full_request_as_the_sdk_sends_it_is_valid_and_names_its_model() -> None:
    body = {"model": "gpt-4o", "input": [{"type": "message", "role": "user",
                                         "content": [{"type": "input_text", "text": "hi"}]}],
            "instructions": "Be brief.", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False, "max_output_tokens": 64, "temperature": 0.5, "top_p": 1,
            "reasoning": {"effort": "low", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True},
                     "verbosity": "low"},
            "store": False, "metadata": {"k": "v"}, "prompt_cache_key": "p", "service_tier": "auto", "user": "u",
            "safety_identifier": "s", "stream": True}
    # The test's own body is what the spec allows (its input item list is a oneOf whose members overlap, so the
    # items are checked on their own).
    validate({**body, "input": "hi"}, "CreateResponse")
    validate(body["input"][0], "InputMessage")
    assert FACE.validate(body) == "gpt-4o"


@pytest.mark.parametrize(("change", "param"), [
    ({"model": None}, "model"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_output_tokens": 8}, "max_output_tokens"),
    ({"max_output_tokens": True}, "max_output_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "name": 3}}, "tool_choice.name"),
    ({"reasoning": {"effort": "ultra"}}, "reasoning.effort"),
    ({"reasoning": {"summary": "long"}}, "reasoning.summary"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"include": ["everything"]}, "include"),
    ({"include": [{}]}, "include"),
    ({"reasoning": {"effort": ["high"]}}, "reasoning.effort"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [3]}]}, "input[0].output[0]"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"input": 5}, "input"),
    ({"input": ["hi"]}, "input[0]"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": ["user"], "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": ["message"], "role": "user", "content": "hi"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": 7}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
    ({"input": [{"content": "no role nor type"}]}, "input[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tools": [{"name": "f"}]}, "tools[0]"),
])
def test_a_malformed_field_is_refused_naming_it(change: dict[str, Any], param: str) -> None:
    with pytest.raises(adapters.RequestError) as caught:
        FACE.validate({"model": "m", "input": "hi", **change})
    assert caught.value.param == param and param.split("[")[0].split(".")[0] in caught.value.message


# --- to_chat ---


def test_a_request_converts_to_the_chat_request_meaning_the_same() -> None:
    body = {"model": "alias", "instructions": "Be brief.", "input": [
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
                                     {"type": "input_file", "file_data": "data:application/pdf;base64,JV",
                                      "filename": "a.pdf"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": adapters.encode_reasoning(SIGNED)},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Paris"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ], "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False,
        "max_output_tokens": 100, "temperature": 0.2, "top_p": 0.9, "reasoning": {"effort": "high", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True},
                 "verbosity": "low"},
        "prompt_cache_key": "thread-1", "service_tier": "flex", "user": "u1", "safety_identifier": "s1",
        "store": False, "metadata": {"k": "v"}, "include": ["reasoning.encrypted_content"], "stream": True}
    assert FACE.to_chat(body) == {
        "model": "alias", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,JV", "filename": "a.pdf"}}]},
            {"role": "assistant", "content": "Checking.", "thinking_blocks": SIGNED, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"],
                                                    "description": "Weather of a city", "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
        "max_completion_tokens": 100, "temperature": 0.2, "top_p": 0.9, "prompt_cache_key": "thread-1",
        "service_tier": "flex", "user": "u1", "safety_identifier": "s1", "reasoning_effort": "high",
        "verbosity": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "strict": True}},
        "stream": True, "stream_options": {"include_usage": True}}


def test_a_string_input_is_one_user_message_and_json_object_format_maps() -> None:
    chat = FACE.to_chat({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}})
    assert chat == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "response_format": {"type": "json_object"}}


def test_a_tool_output_with_an_image_becomes_a_tool_message_and_a_user_message() -> None:
    chat = FACE.to_chat({"model": "m", "input": [
        {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]})
    assert chat["messages"][1:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "see"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]


def test_foreign_or_unsigned_reasoning_items_are_no_model_input() -> None:
    chat = FACE.to_chat({"model": "m", "input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}], "encrypted_content": "gAAA"},
        {"type": "reasoning", "summary": [], "encrypted_content": "uni-api.v1:!!notbase64"}]})
    assert chat["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("change", "named"), [
    ({"tools": [{"type": "web_search"}]}, "web_search"),
    ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "custom"),
    ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "file_search"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]}, "input_file"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
])
def test_what_only_a_responses_native_upstream_serves_is_a_400_naming_it(change: dict[str, Any], named: str) -> None:
    body = {"model": "m", "input": "hi", **change}
    FACE.validate(body)  # well-formed: a native channel may take it
    with pytest.raises(adapters.UpstreamError) as caught:
        FACE.to_chat(body)
    assert caught.value.status == 400 and caught.value.retryable and named in caught.value.message


def test_fields_with_no_effect_on_a_converted_answer_are_accepted() -> None:
    body = {"model": "m", "input": "hi", "truncation": "disabled", "top_logprobs": 0, "background": False,
            "include": ["reasoning.encrypted_content", "web_search_call.action.sources"], "max_tool_calls": 3,
            "stream_options": {"include_obfuscation": False}, "client_metadata": {"a": "b"}}
    assert FACE.to_chat(body) == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# --- from_chat ---


def test_a_text_answer_is_a_completed_response_echoing_the_request() -> None:
    body = {"model": "alias", "input": "hi", "instructions": "Be brief.", "tools": [WEATHER], "temperature": 0.3,
            "metadata": {"k": "v"}, "store": False, "max_output_tokens": 50}
    response = FACE.from_chat(completion({"role": "assistant", "content": "Hello"}), body, "alias")
    validate_response(response)
    assert response["id"].startswith("resp_") and response["object"] == "response"
    assert (response["status"], response["model"], response["created_at"]) == ("completed", "alias", 1700000000)
    [message] = response["output"]
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]
    assert response["usage"] == {
        "input_tokens": 9, "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0}, "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13}
    assert (response["instructions"], response["temperature"], response["top_p"], response["metadata"],
            response["store"], response["max_output_tokens"]) == ("Be brief.", 0.3, 1.0, {"k": "v"}, False, 50)
    assert response["tools"] == [WEATHER] and response["tool_choice"] == "auto"


def test_tool_calls_become_function_call_items_after_the_text() -> None:
    message = {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}
    response = FACE.from_chat(completion(message, "tool_calls"), {"model": "m", "tools": [WEATHER]}, "m")
    validate_response(response)
    assert [item["type"] for item in response["output"]] == ["message", "function_call", "function_call"]
    calls = response["output"][1:]
    assert [(c["call_id"], c["name"], c["arguments"], c["status"]) for c in calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}', "completed"), ("call_2", "get_weather", '{"city":"Rome"}',
                                                                     "completed")]
    assert all(c["id"].startswith("fc_") for c in calls)


def test_claude_thinking_becomes_a_reasoning_item_whose_encrypted_content_replays_it() -> None:
    message = {"role": "assistant", "content": None, "reasoning_content": "Look it up.", "thinking_blocks": SIGNED,
               "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    body = {"model": "m", "input": "weather?", "reasoning": {"effort": "low", "summary": "auto"}}
    response = FACE.from_chat(completion(message, "tool_calls"), body, "m")
    validate_response(response)
    reasoning, call = response["output"]
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Look it up."}]
    replay = {"model": "m", "input": [{"role": "user", "content": "weather?"}, reasoning, call,
                                      {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}]}
    FACE.validate(replay)
    chat = FACE.to_chat(replay)
    assert chat["messages"][1]["thinking_blocks"] == SIGNED
    claude = adapters.ClaudeAdapter().payload(chat, adapters.Target(
        adapters.Provider("ant", "claude", "https://api.anthropic.com/v1/messages"), "claude-sonnet-4-5"))
    assert claude["messages"][1] == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Look it up.", "signature": "sig-1"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}


def test_reasoning_without_a_summary_request_is_reasoning_text_content() -> None:
    message = {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
    response = FACE.from_chat(completion(message), {"model": "m", "input": "2+2?"}, "m")
    validate_response(response)
    assert response["output"][0]["content"] == [{"type": "reasoning_text", "text": "2+2"}]
    assert "encrypted_content" not in response["output"][0]


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_a_cut_answer_is_an_incomplete_response_with_its_reason(finish: str, reason: str) -> None:
    response = FACE.from_chat(completion({"role": "assistant", "content": "Hel"}, finish), {"model": "m"}, "m")
    validate_response(response)
    assert (response["status"], response["incomplete_details"]) == ("incomplete", {"reason": reason})


def test_a_refusal_is_a_refusal_content_part() -> None:
    response = FACE.from_chat(completion({"role": "assistant", "content": None, "refusal": "No."}), {"model": "m"}, "m")
    validate_response(response)
    assert response["output"][0]["content"] == [{"type": "refusal", "refusal": "No."}]


# --- stream ---


def test_a_text_stream_gives_the_exact_event_sequence_with_usage() -> None:
    events = run_stream({"model": "m", "input": "hi", "stream": True}, [
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({}, "stop"), usage_chunk()])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert {e.get("item_id") for e in events[3:8]} == {item_id}
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello" and events[7]["part"]["text"] == "Hello"
    assert events[8]["item"]["status"] == "completed"
    final = events[-1]["response"]
    validate_response(final)
    assert final["id"] == events[0]["response"]["id"] and final["status"] == "completed"
    assert final["output"] == [events[8]["item"]]
    assert final["usage"]["input_tokens"] == 9 and final["usage"]["output_tokens_details"]["reasoning_tokens"] == 2


def test_streamed_tool_calls_are_items_whose_done_event_carries_the_full_arguments() -> None:
    def call(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
        function = {"arguments": arguments, **({"name": name} if name else {})}
        return chunk({"tool_calls": [{"index": index, **({"id": call_id, "type": "function"} if call_id else {}),
                                      "function": function}]})

    events = run_stream({"model": "m", "input": "hi", "tools": [WEATHER]}, [
        chunk({"role": "assistant", "content": "On it."}), call(0, "call_a", "get_weather", ""),
        call(0, None, None, '{"city":'), call(0, None, None, '"Paris"}'), call(1, "call_b", "get_weather", "{}"),
        chunk({}, "tool_calls"), usage_chunk()])
    names = [e["type"] for e in events]
    assert names[8:] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added = events[8]["item"]
    assert (added["type"], added["call_id"], added["name"], added["arguments"]) == (
        "function_call", "call_a", "get_weather", "")
    assert events[11]["arguments"] == '{"city":"Paris"}' and events[11]["name"] == "get_weather"
    assert events[12]["item"]["arguments"] == '{"city":"Paris"}' and events[12]["output_index"] == 1
    assert events[13]["output_index"] == 2 and events[16]["item"]["call_id"] == "call_b"
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call", "function_call"]


def test_streamed_claude_thinking_is_a_summary_with_its_signature_in_encrypted_content() -> None:
    events = run_stream({"model": "m", "input": "hi", "reasoning": {"effort": "low", "summary": "auto"}}, [
        chunk({"role": "assistant", "reasoning_content": "Look "}), chunk({"reasoning_content": "it up."}),
        chunk({"thinking_blocks": SIGNED}), chunk({"content": "Sunny."}), chunk({}, "stop"), usage_chunk()])
    assert [e["type"] for e in events][:9] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done"]
    done = events[8]["item"]
    assert done["summary"] == [{"type": "summary_text", "text": "Look it up."}]
    assert adapters.decode_reasoning(done["encrypted_content"]) == SIGNED
    assert events[-1]["response"]["output"][0] == done


def test_streamed_reasoning_without_a_summary_request_uses_reasoning_text_events() -> None:
    events = run_stream({"model": "m", "input": "hi"}, [
        chunk({"role": "assistant", "reasoning_content": "hmm"}), chunk({"content": "4"}), chunk({}, "stop")])
    assert [e["type"] for e in events][2:7] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done"]


def test_a_redacted_thinking_block_opens_a_reasoning_item_of_its_own() -> None:
    redacted = [{"type": "redacted_thinking", "data": "opaque"}]
    events = run_stream({"model": "m", "input": "hi"}, [
        chunk({"role": "assistant", "thinking_blocks": redacted}), chunk({"content": "ok"}), chunk({}, "stop")])
    assert [e["type"] for e in events][2:4] == ["response.output_item.added", "response.output_item.done"]
    assert adapters.decode_reasoning(events[3]["item"]["encrypted_content"]) == redacted


def test_a_stream_cut_by_max_tokens_ends_incomplete() -> None:
    events = run_stream({"model": "m", "input": "hi"}, [chunk({"content": "Hel"}), chunk({}, "length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_a_stream_failing_after_its_start_ends_with_one_response_failed() -> None:
    events = run_stream({"model": "m", "input": "hi"}, [chunk({"content": "Hel"})], fail=("upstream reset", 502))
    assert [e["type"] for e in events][-2:] == ["response.output_item.done", "response.failed"]
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "upstream reset"}
    assert sum(e["type"].startswith("response.") and e["type"] in (
        "response.completed", "response.failed", "response.incomplete") for e in events) == 1


def test_a_refusal_streams_as_refusal_events() -> None:
    events = run_stream({"model": "m", "input": "hi"}, [chunk({"refusal": "No."}), chunk({}, "stop")])
    assert [e["type"] for e in events][3:6] == ["response.content_part.added", "response.refusal.delta",
                                                 "response.refusal.done"]


def test_an_empty_stream_still_opens_and_completes() -> None:
    events = run_stream({"model": "m", "input": "hi"}, [])
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.completed"]


# --- store helpers and errors ---


def test_chaining_prepends_the_stored_input_and_output_items() -> None:
    first = {"model": "m", "input": "hi", "instructions": "Be brief."}
    response = FACE.from_chat(completion({"role": "assistant", "content": "Hello"}), first, "m")
    chained = adapters.chain_input(adapters.stored_items(first, response),
                                   {"model": "m", "input": "again", "previous_response_id": response["id"]})
    assert "previous_response_id" not in chained  # resolved: no engine gets the gateway's own id
    echoed = adapters.ResponsesFace(previous_response_id=response["id"]).from_chat(
        completion({"role": "assistant", "content": "ok"}), chained, "m")
    assert echoed["previous_response_id"] == response["id"]
    assert FACE.to_chat(chained)["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "again"}]


def test_an_unknown_previous_response_is_openais_previous_response_not_found() -> None:
    error = adapters.previous_not_found("resp_x")
    assert (error.message, error.param, error.code) == (
        "Previous response with id 'resp_x' not found.", "previous_response_id", "previous_response_not_found")
    body = FACE.error_body(error.message, 400, "invalid_request_error", error.code, error.param)
    validate(body, "ErrorResponse")


# --- native passthrough ---


def test_native_events_are_relayed_with_the_alias_and_usage_from_the_terminal_event() -> None:
    stream = FACE.native_stream({}, "alias")
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_up", "model": "up"}}
    done = {"type": "response.completed", "sequence_number": 1, "response": {
        "id": "resp_up", "model": "up", "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7,
                                                  "input_tokens_details": {"cached_tokens": 1},
                                                  "output_tokens_details": {"reasoning_tokens": 0}}}}
    first = stream.on_event(adapters.SSEEvent("response.created", json.dumps(created)))
    assert first.startswith(b"event: response.created\ndata: ") and b'"model":"alias"' in first
    assert not stream.done
    stream.on_event(adapters.SSEEvent("response.completed", json.dumps(done)))
    assert stream.done and stream.usage == adapters.build_usage(5, 2, cached=1, reasoning=0)


def test_a_native_error_before_anything_was_relayed_fails_the_attempt() -> None:
    stream = FACE.native_stream({}, "alias")
    error = {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "sequence_number": 0}
    with pytest.raises(adapters.UpstreamError, match="slow down"):
        stream.on_event(adapters.SSEEvent("error", json.dumps(error)))


def test_a_native_answer_shows_the_alias_and_reports_its_usage() -> None:
    raw = json.dumps({"id": "resp_1", "object": "response", "model": "up", "output": [],
                      "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}).encode()
    sent, usage = FACE.native_answer(raw, "alias")
    assert json.loads(sent)["model"] == "alias" and usage == adapters.build_usage(3, 1)
