"""Tool calls with the official openai client: `required`, a named function and `auto`, whole
and streamed, and the round trip with the tool's result. SmolLM2's template knows no tools, so
this is llmesh's generic format, held to each tool's schema by its grammar."""

import json

import openai
import pytest

from conftest import API_KEY

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture
def client(node_url):
    return openai.OpenAI(base_url=f"{node_url}/v1", api_key=API_KEY, max_retries=0)


def check_weather_arguments(arguments: str):
    parsed = json.loads(arguments)
    assert set(parsed) == {"city", "unit"}
    assert isinstance(parsed["city"], str) and len(parsed["city"]) <= 30
    assert parsed["unit"] in ("celsius", "fahrenheit")


def streamed_calls(stream):
    """The calls of a streamed answer, put together from OpenAI's deltas, and its finish reason."""
    calls, finish_reason, content = {}, None, ""
    for chunk in stream:
        choice = chunk.choices[0]
        finish_reason = choice.finish_reason or finish_reason
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:
                assert delta.id.startswith("call_") and delta.type == "function"
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish_reason, content


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_round_trip(client, stream):
    tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    request = dict(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                   temperature=0, max_tokens=200)
    if stream:
        calls, finish_reason, content = streamed_calls(client.chat.completions.create(stream=True, **request))
        assert content == ""
    else:
        choice = client.chat.completions.create(**request).choices[0]
        finish_reason = choice.finish_reason
        assert choice.message.content is None
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls]
    assert finish_reason == "tool_calls"
    assert [call["name"] for call in calls] == ["get_weather"] * len(calls)
    for call in calls:
        check_weather_arguments(call["arguments"])

    call = calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny and 21 degrees."},
    ]
    final = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="none", temperature=0, max_tokens=60)
    assert final.choices[0].message.content.strip()
    assert not final.choices[0].message.tool_calls


def test_required_and_auto_answers_are_well_formed(client):
    required = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", temperature=0.7, seed=3, max_tokens=200)
    message = required.choices[0].message
    assert required.choices[0].finish_reason == "tool_calls"
    for call in message.tool_calls:
        if call.function.name == "get_weather":
            check_weather_arguments(call.function.arguments)
        else:
            assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}

    auto = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                          temperature=0, max_tokens=200)
    choice = auto.choices[0]
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls
    else:
        assert choice.message.content and not choice.message.content.startswith("{")


def test_malformed_tools_are_400s_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert error.value.body["param"] == "tool_choice"
