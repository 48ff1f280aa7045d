#!/usr/bin/env python3
"""The HTTP load of scripts/bench-vs-llamacpp.sh, the same for any OpenAI-compatible server.

Streamed /v1/chat/completions (temperature 0, ignore_eos), Python's standard library only:
  1. the second turn of a chat: a conversation answered once, then grown by that answer and a new
     question; the time to first token of that second request (what a prompt cache is for);
  2. CLIENTS clients at once, each sending REQUESTS requests one after the other, every request a
     prompt of its own (a numbered system message first, so no two prompts share more than the
     template's first tokens) of about PROMPT tokens, for MAX_TOKENS tokens each.
Prints one JSON object: total tokens/s, median time to first token, tokens counted, ...

    scripts/chat-load.py --port 8080 [--clients 4] [--requests 3] [--max-tokens 128]
"""

import argparse
import http.client
import itertools
import json
import statistics
import sys
import threading
import time

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a "
    "notebook and a flask of tea. From the gallery he could see the whole bay: the fishing boats "
    "coming home, the ferry crossing to the island, the gulls circling over the harbour wall. He "
    "wrote down the wind, the state of the sea and every ship that passed, as his father had done "
    "before him. Describe one evening of his in detail."
)
SYSTEM = "You are a helpful assistant."
SECOND_QUESTION = "And what did he write in his notebook that evening?"

serial = itertools.count(1)


def request(port, messages, max_tokens, ignore_eos=True):
    """One streamed chat completion: time to first token, tokens, text."""
    body = json.dumps({
        "model": "chat", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True},
    })
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        sys.exit(f"HTTP {response.status} from port {port}: {response.read()[:500]!r}")
    first, chunks, usage, text = None, 0, None, []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            sys.exit(f"error from port {port}: {chunk['error']}")
        if chunk.get("usage"):
            usage = chunk["usage"]
        content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
        if content:
            first = first or time.monotonic()
            chunks += 1
            text.append(content)
    total = time.monotonic() - started
    connection.close()
    return {
        "ttft": (first - started if first else total) * 1000,
        "total": total,
        "tokens": usage["completion_tokens"] if usage else chunks,
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
        "text": "".join(text),
    }


def own_prompt():
    """A conversation no other request begins like."""
    return [{"role": "system", "content": f"{next(serial)}. {SYSTEM}"}, {"role": "user", "content": PASSAGE}]


def second_turn(port):
    first = own_prompt()
    answer = request(port, first, 64, ignore_eos=False)
    grown = first + [{"role": "assistant", "content": answer["text"]}, {"role": "user", "content": SECOND_QUESTION}]
    return request(port, grown, 8, ignore_eos=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3, help="per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=3, help="second chat turns measured (median)")
    args = parser.parse_args()

    request(args.port, own_prompt(), 8)  # warm-up: first-touch page faults, lazily built state
    turns = [second_turn(args.port) for _ in range(args.turns)]

    results = []
    lock = threading.Lock()

    def client():
        for _ in range(args.requests):
            result = request(args.port, own_prompt(), args.max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    tokens = sum(r["tokens"] for r in results)
    print(json.dumps({
        "clients": args.clients,
        "requests": len(results),
        "prompt_tokens": statistics.median(r["prompt_tokens"] or 0 for r in results),
        "completion_tokens": tokens,
        "short_answers": sum(r["tokens"] < args.max_tokens for r in results),
        "seconds": round(wall, 2),
        "tokens_per_second": round(tokens / wall, 1),
        "ttft_median_ms": round(statistics.median(r["ttft"] for r in results), 1),
        "second_turn_prompt_tokens": turns[0]["prompt_tokens"],
        "second_turn_ttft_ms": round(statistics.median(t["ttft"] for t in turns), 1),
    }))


if __name__ == "__main__":
    main()
