"""Frameworks that build on the OpenAI API, pointed at a node: LangChain's
`ChatOpenAI(...).with_structured_output(Model)` (JSON schema and function calling) and an OpenAI
Agents SDK agent with one function tool, over the Responses API."""

from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic import BaseModel, Field
import pytest

from conftest import API_KEY


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(node_url, method):
    llm = ChatOpenAI(model="smollm2", base_url=f"{node_url}/v1", api_key=API_KEY, temperature=0,
                     max_tokens=120, max_retries=0)
    structured = llm.with_structured_output(City, method=method)
    city = structured.invoke([("system", "You extract facts."), ("human", "Paris is the capital of France.")])
    assert isinstance(city, City)
    assert city.name and city.country


def test_agents_sdk_calls_a_function_tool(node_url):
    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    client = AsyncOpenAI(base_url=f"{node_url}/v1", api_key=API_KEY, max_retries=0)
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model="smollm2", openai_client=client),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=100),
        tool_use_behavior="stop_on_first_tool",
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?")
    assert len(calls) == 1 and calls[0]
    assert result.final_output == f"Sunny in {calls[0]}"
