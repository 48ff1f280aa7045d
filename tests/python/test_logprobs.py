"""Log-probabilities and `n` with the official openai client: chat and legacy completions, whole and
streamed, agreeing with the text."""

import math

import openai
import pytest

from conftest import API_KEY

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]


@pytest.fixture
def client(node_url):
    return openai.OpenAI(base_url=f"{node_url}/v1", api_key=API_KEY, max_retries=0)


def test_chat_logprobs_agree_with_the_text(client):
    answer = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=10,
                                            logprobs=True, top_logprobs=2)
    choice = answer.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert bytes(b for entry in entries for b in entry.bytes).decode().startswith(choice.message.content)
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert sum(math.exp(top.logprob) for top in entry.top_logprobs) <= 1.0001

    stream = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0, max_tokens=10,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [entry.token for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content or []]
    assert streamed == [entry.token for entry in entries]


def test_completion_logprobs(client):
    answer = client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=6,
                                       logprobs=3)
    logprobs = answer.choices[0].logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs)
    assert all(len(top) == 3 for top in logprobs.top_logprobs)


def test_n_gives_several_choices(client):
    answer = client.chat.completions.create(model="smollm2", messages=ASK, n=3, temperature=1, seed=11,
                                            max_tokens=12)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert all(choice.message.content and choice.finish_reason for choice in answer.choices)
    single = client.chat.completions.create(model="smollm2", messages=ASK, temperature=1, seed=11, max_tokens=12)
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens
    assert answer.choices[0].message.content == single.choices[0].message.content  # the same seed
