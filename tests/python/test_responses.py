"""The Responses API with the official openai client: `responses.create` and `responses.stream`,
plain text, a function tool round trip, a JSON schema in `text.format`, and the 400 for
`previous_response_id` (llmesh keeps no state)."""

import json

import openai
import pytest
from pydantic import BaseModel

from conftest import API_KEY

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture
def client(node_url):
    return openai.OpenAI(base_url=f"{node_url}/v1", api_key=API_KEY, max_retries=0)


def test_create_answers_with_text(client):
    response = client.responses.create(model="smollm2", instructions="Be brief.", input="Name a color.",
                                       temperature=0, max_output_tokens=20)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0


def test_stream_gives_the_same_text_as_its_events(client):
    # Room for the whole answer (about 60 tokens): one cut short ends with `response.incomplete`,
    # and the SDK's `get_final_response` wants `response.completed`.
    deltas = []
    with client.responses.stream(model="smollm2", instructions="Be brief.", input="Name a fruit.",
                                 temperature=0, max_output_tokens=200) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    assert final.status == "completed"
    plain = client.responses.create(model="smollm2", instructions="Be brief.", input="Name a fruit.",
                                    temperature=0, max_output_tokens=200)
    assert plain.output_text == final.output_text


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_round_trip(client, stream):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    request = dict(model="smollm2", input=ask, tools=[WEATHER], tool_choice="required", temperature=0,
                   max_output_tokens=100)
    if stream:
        arguments = ""
        with client.responses.stream(**request) as events:
            for event in events:
                if event.type == "response.function_call_arguments.delta":
                    arguments += event.delta
            response = events.get_final_response()
    else:
        response = client.responses.create(**request)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert set(json.loads(calls[0].arguments)) == {"city"}
    if stream:
        assert arguments == calls[0].arguments

    follow_up = ask + [
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 degrees."},
    ]
    final = client.responses.create(model="smollm2", input=follow_up, tools=[WEATHER], tool_choice="none",
                                    temperature=0, max_output_tokens=40)
    assert final.output_text.strip()


class Color(BaseModel):
    name: str
    hex: str


def test_parse_with_a_pydantic_model(client):
    response = client.responses.parse(model="smollm2", input="Describe the color red as JSON.", text_format=Color,
                                      temperature=0, max_output_tokens=100)
    assert isinstance(response.output_parsed, Color)


def test_previous_response_id_is_refused(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="smollm2", input="hi", previous_response_id="resp_123")
    assert error.value.body["param"] == "previous_response_id"
