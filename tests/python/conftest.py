"""Starts a two-node llmesh cluster (the binary in $LLMESH_BIN) on loopback for the tests: a host
serving the demo models and an entry node with no model of its own, which the tests talk to, so
every request crosses the cluster to the host and back. Both are stopped afterwards, also when a
test fails or start-up does."""

import os
import socket
import subprocess
import time

import httpx
import pytest

API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
START_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, process, what):
    deadline = time.monotonic() + START_SECONDS
    while True:
        assert process.poll() is None, f"llmesh exited while waiting for {what}"
        try:
            value = condition()
            if value:
                return value
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not happen within {START_SECONDS} s"
        time.sleep(0.2)


def loopback_address(url):
    """The overlay address this node listens on, with its peer id, from /api/nodes."""
    nodes = httpx.get(f"{url}/api/nodes", headers=HEADERS, timeout=2).json()["data"]
    this = next(node for node in nodes if node["this_node"])
    return next((address for address in this["addresses"] if "/ip4/127.0.0.1/" in address), None)


def hosted_by(url, model, host):
    listing = httpx.get(f"{url}/v1/models", headers=HEADERS, timeout=2).json()["data"]
    return any(m["id"] == model and any(h["name"] == host for h in m["llmesh"]["hosts"]) for m in listing)


@pytest.fixture(scope="session")
def node_url(tmp_path_factory):
    binary = os.environ.get("LLMESH_BIN", "target/debug/llmesh")
    models = os.environ.get("LLMESH_MODELS_DIR", "models")
    processes = []

    def start(name, *flags):
        port = free_port()
        process = subprocess.Popen([
            binary, "serve",
            "--listen", f"127.0.0.1:{port}",
            "--api-key", API_KEY,
            "--p2p-listen", "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--data-dir", str(tmp_path_factory.mktemp(name)),
            "--name", name,
            *flags,
        ])
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, process,
                   f"{name} to answer /health")
        return url, process

    try:
        host_url, host = start(
            "pytest-host",
            "--model", f"smollm2={models}/SmolLM2-135M-Instruct.Q4_1.gguf",
            "--model", f"minilm={models}/all-MiniLM-L6-v2",
        )
        address = wait_until(lambda: loopback_address(host_url), host, "the host's overlay address")
        entry_url, entry = start("pytest-entry", "--peer", address)
        for model in ("smollm2", "minilm"):
            wait_until(lambda: hosted_by(entry_url, model, "pytest-host"), entry,
                       f"the entry node to route {model} to the host")
        yield entry_url
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
