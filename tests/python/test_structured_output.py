"""Structured output with the official openai client: `parse()` with a nested pydantic model,
`json_object`, and the 400s a malformed or unsupported `response_format` gets."""

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import API_KEY


class Address(BaseModel):
    city: str = Field(max_length=30)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    address: Address
    hobbies: list[str] = Field(min_length=1, max_length=3)


ASK = [
    {"role": "system", "content": "You extract facts as JSON."},
    {"role": "user", "content": "Bob is 41, a guest from Lyon (69001) who likes chess and cycling."},
]


@pytest.fixture
def client(node_url):
    return openai.OpenAI(base_url=f"{node_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.mark.parametrize("temperature", [0, 1])
def test_parse_returns_a_valid_nested_model(client, temperature):
    completion = client.chat.completions.parse(
        model="smollm2",
        messages=ASK,
        response_format=Person,
        temperature=temperature,
        seed=7,
        max_tokens=300,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person)
    # parse() validated it with pydantic; the raw text is the same object.
    assert Person.model_validate_json(choice.message.content) == person


def test_json_object_parses(client):
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give the capitals of France and Italy."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_json_schema_streamed(client):
    stream = client.chat.completions.create(
        model="smollm2",
        messages=ASK,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True},
        },
        temperature=0,
        max_tokens=300,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    Person.model_validate_json(text)


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ("json", "response_format"),
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_response_formats_get_a_400_naming_the_field(client, response_format, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="smollm2", messages=ASK, response_format=response_format, max_tokens=5
        )
    assert refused.value.body["param"] == param
