"""Malformed requests against a real node: each gets its OpenAI-shaped error, and the node keeps
serving afterwards."""

import httpx
import pytest

from conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"

CASES = [
    ("truncated json", CHAT, b'{"model": "smollm2", "messages": [', 400),
    ("wrong types", CHAT, b'{"model": 5, "messages": "hi"}', 400),
    ("empty messages", CHAT, b'{"model": "smollm2", "messages": []}', 400),
    (
        "huge max_tokens",
        CHAT,
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000000000}',
        400,
    ),
    ("non-utf8 bytes", CHAT, b'{"model": "smollm2\xff\xfe", "messages": []}', 400),
    ("10 MB body", CHAT, b'{"model": "smollm2", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}', 413),
    ("embeddings without input", "/v1/embeddings", b'{"model": "minilm"}', 400),
]


@pytest.mark.parametrize("name,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_error_and_the_node_keeps_serving(node_url, name, path, body, status):
    response = httpx.post(node_url + path, content=body, headers=HEADERS, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    healthy = httpx.post(
        node_url + CHAT,
        json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers=HEADERS,
        timeout=60,
    )
    assert healthy.status_code == 200, healthy.text
