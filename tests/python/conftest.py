"""Starts one real llmesh node (the binary in $LLMESH_BIN) with the demo models for the tests,
on a free loopback port, and stops it afterwards, also when a test fails."""

import os
import socket
import subprocess
import time

import httpx
import pytest

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def node_url(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("llmesh-node")
    binary = os.environ.get("LLMESH_BIN", "target/debug/llmesh")
    models = os.environ.get("LLMESH_MODELS_DIR", "models")
    port = free_port()
    process = subprocess.Popen(
        [
            binary, "serve",
            "--listen", f"127.0.0.1:{port}",
            "--model", f"smollm2={models}/SmolLM2-135M-Instruct.Q4_1.gguf",
            "--model", f"minilm={models}/all-MiniLM-L6-v2",
            "--api-key", API_KEY,
            "--p2p-listen", "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--data-dir", str(data_dir),
            "--name", "pytest-node",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "llmesh exited during start-up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llmesh did not start within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
