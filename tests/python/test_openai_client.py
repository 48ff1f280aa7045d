"""The official openai Python client against a running llmesh node (the entry node of a two-node
cluster: the models are on the other one)."""

import openai
import pytest

from conftest import API_KEY

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture
def client(node_url):
    return openai.OpenAI(base_url=f"{node_url}/v1", api_key=API_KEY, max_retries=0)


def test_lists_both_models(client):
    ids = {model.id for model in client.models.list()}
    assert ids == {"smollm2", "minilm"}


def test_the_models_are_on_the_other_node(client):
    for model in client.models.list():
        assert [host["name"] for host in model.llmesh["hosts"]] == ["pytest-host"]


def test_chat(client):
    answer = client.chat.completions.create(
        model="smollm2", messages=[SYSTEM, QUESTION], temperature=0, max_tokens=40
    )
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens > 0


def test_chat_streamed_matches_plain(client):
    plain = client.chat.completions.create(
        model="smollm2", messages=[SYSTEM, QUESTION], temperature=0, max_tokens=40
    )
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=[SYSTEM, QUESTION],
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_embeddings(client):
    result = client.embeddings.create(model="minilm", input=["a cat", "a kitten", "tax law"])
    vectors = [item.embedding for item in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])


def test_embeddings_base64_matches_float(client):
    as_float = client.embeddings.create(model="minilm", input="hello", encoding_format="float")
    # The client decodes base64 itself when it asked for it without saying so explicitly.
    as_default = client.embeddings.create(model="minilm", input="hello")
    assert as_default.data[0].embedding == pytest.approx(as_float.data[0].embedding, abs=1e-6)


def test_wrong_key_raises_authentication_error(node_url):
    bad = openai.OpenAI(base_url=f"{node_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[QUESTION])
