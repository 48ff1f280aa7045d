#!/usr/bin/env python3
"""What structured output costs: decode speed with and without a response_format grammar.

Sends one chat prompt, streamed, temperature 0, MAX_TOKENS tokens, in three modes:
  free         no response_format;
  json_schema  response_format json_schema (strict): a person with name, age, city, hobbies;
  json_object  response_format json_object (any JSON object).
Each round runs every mode once, in an order that rotates from round to round, so that machine
noise and drift hit every mode alike. Per request: completion tokens (usage), time to first token,
and decode tokens/s (the tokens after the first over the time from the first content chunk to the
chunk with finish_reason). Prints a table of medians per mode and the ratios to `free`.

The modes' answers differ in length (a JSON object ends where its grammar does, a free answer runs
to MAX_TOKENS), and a step costs more the longer the context, so whole-answer rates favour the
short answers. `matched` therefore also compares the same stretch: the first K tokens after the
first of both, K being the shortest answer of that grammar mode less one (counted in content
chunks, one per token here: `chunks_equal_tokens` says whether that held); `paired_ratio_to_free`
is the median over rounds of that ratio within each round, which drift between rounds cancels;
`median_gap_us` the median time between two of those tokens, which a burst of other load on the
machine moves less than it moves a mean.

With --log (the node's stderr, run with RUST_LOG=info,llmesh=debug) it also joins each request with
its log lines by request id (`x-request-id`): the engine's per-generation `grammar masks` line
(mask computation, step time spent waiting for the mask beyond the forward pass, applying the
mask and advancing the grammar; microseconds per token), and `grammar compiled` (milliseconds; that
line has no request id, so it is taken from what the log gained while the request ran).

--concurrent adds a second part: rounds of two streams at once, `free + free` then
`json_schema + free`, in alternation, to show what a schema neighbour in the same batched step does
to the other stream, over the first K tokens of both (K: the shortest schema answer less one).

    RUST_LOG=info,llmesh=debug llmesh serve --no-mdns --listen 127.0.0.1:8090 \\
        --model smollm2=models/SmolLM2-135M-Instruct.Q4_1.gguf 2> node.log &
    scripts/bench-structured.py --port 8090 --model smollm2 --log node.log [--rounds 8] [--concurrent]

Standard library only. Run it on an otherwise idle machine: it measures time.
"""

import argparse
import http.client
import json
import re
import statistics
import sys
import threading
import time

PROMPT = "Describe a person: name, age, city, hobbies."
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
FORMATS = {
    "free": None,
    "json_schema": {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}},
    "json_object": {"type": "json_object"},
}
MODES = list(FORMATS)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
NUMBER = r"([0-9.eE+-]+)"
LOG_FIELDS = {
    "mask_us": re.compile(r"mask_microseconds_per_token=" + NUMBER),
    "mask_wait_us": re.compile(r"mask_wait_microseconds_per_token=" + NUMBER),
    "apply_accept_us": re.compile(r"apply_and_accept_microseconds_per_token=" + NUMBER),
}


def log_size(log_path):
    try:
        with open(log_path, "rb") as log:
            return log.seek(0, 2)
    except (OSError, TypeError):
        return None


def log_since(log_path, offset):
    with open(log_path, "rb") as log:
        log.seek(offset)
        return ANSI.sub("", log.read().decode("utf-8", "replace"))


def request(port, model, mode, max_tokens, log_path=None):
    """One streamed chat completion in `mode`: timings, tokens, the request id."""
    body = {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }
    if FORMATS[mode]:
        body["response_format"] = FORMATS[mode]
    log_offset = log_size(log_path)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        sys.exit(f"HTTP {response.status} ({mode}): {response.read()[:500]!r}")
    request_id = response.getheader("x-request-id")
    chunks, finished, finish_reason, usage, text = [], None, None, None, []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            sys.exit(f"error ({mode}): {chunk['error']}")
        now = time.monotonic()
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice["delta"].get("content"):
                chunks.append(now)
                text.append(choice["delta"]["content"])
            if choice.get("finish_reason"):
                finished, finish_reason = now, choice["finish_reason"]
    connection.close()
    if not chunks:
        sys.exit(f"no content ({mode})")
    tokens = usage["completion_tokens"] if usage else len(chunks)
    end = finished or chunks[-1]
    compile_ms = None
    if log_offset is not None:
        compiled = re.findall(r"grammar compiled milliseconds=" + NUMBER, log_since(log_path, log_offset))
        compile_ms = float(compiled[-1]) if compiled else None
    return {
        "mode": mode, "request_id": request_id, "tokens": tokens, "finish_reason": finish_reason,
        "compile_ms": compile_ms,
        "ttft_ms": (chunks[0] - started) * 1000,
        "decode_tps": (tokens - 1) / (end - chunks[0]) if tokens > 1 and end > chunks[0] else None,
        "chunks": chunks, "text": "".join(text),
    }


def with_log(results, log_path):
    """Add each request's engine figures from the node's log (joined by request id)."""
    if not log_path:
        return
    time.sleep(0.3)  # the last request's lines may still be on their way to the file
    with open(log_path, encoding="utf-8", errors="replace") as log:
        lines = [ANSI.sub("", line) for line in log]
    for result in results:
        mine = [line for line in lines if result["request_id"] and result["request_id"] in line]
        for field, pattern in LOG_FIELDS.items():
            for line in mine:
                found = pattern.search(line)
                if found:
                    result[field] = float(found.group(1))


def rate_over(result, count):
    """Content chunks/s over the `count` chunks after the first."""
    chunks = result["chunks"]
    if len(chunks) <= count or count < 1:
        return None
    return count / (chunks[count] - chunks[0])


def median_gap(result, count):
    """Median microseconds between the first `count` + 1 content chunks."""
    chunks = result["chunks"][:count + 1]
    return statistics.median(b - a for a, b in zip(chunks, chunks[1:])) * 1e6 if len(chunks) > 1 else None


def median(results, field):
    values = [r[field] for r in results if r.get(field) is not None]
    return statistics.median(values) if values else None


def sequential(args):
    for mode in MODES:  # warm-up: first-touch page faults, the prompt cache, lazily built state
        request(args.port, args.model, mode, args.max_tokens)
    results, rounds = [], []
    for round_index in range(args.rounds):
        order = MODES[round_index % len(MODES):] + MODES[:round_index % len(MODES)]
        for mode in order:
            results.append(request(args.port, args.model, mode, args.max_tokens, args.log))
        rounds.append({r["mode"]: r for r in results[-len(MODES):]})
    with_log(results, args.log)
    table = {}
    for mode in MODES:
        mine = [r for r in results if r["mode"] == mode]
        row = {
            "requests": len(mine),
            "decode_tps": median(mine, "decode_tps"),
            "decode_tps_min_max": [min(r["decode_tps"] for r in mine), max(r["decode_tps"] for r in mine)],
            "ttft_ms": median(mine, "ttft_ms"),
            "tokens": median(mine, "tokens"),
            "finish_reasons": sorted({r["finish_reason"] for r in mine}),
            "chunks_equal_tokens": all(len(r["chunks"]) == r["tokens"] for r in mine),
        }
        for field in ("mask_us", "mask_wait_us", "apply_accept_us", "compile_ms"):
            row[field] = median(mine, field)
        if row["decode_tps"]:
            between = 1e6 / row["decode_tps"]
            row["us_between_tokens"] = between
            if row["mask_us"] is not None:
                row["mask_share_of_between"] = row["mask_us"] / between
            if row["mask_wait_us"] is not None:
                on_path = row["mask_wait_us"] + (row["apply_accept_us"] or 0)
                row["critical_path_share_of_between"] = on_path / between
        row["sample"] = mine[-1]["text"][:160]
        table[mode] = row
    free = table["free"]
    for mode in ("json_schema", "json_object"):
        table[mode]["decode_ratio_to_free"] = table[mode]["decode_tps"] / free["decode_tps"]
        table[mode]["ttft_ratio_to_free"] = table[mode]["ttft_ms"] / free["ttft_ms"]
        count = min(len(r["chunks"]) for r in results if r["mode"] == mode) - 1
        matched = {"first_tokens": count}
        for name, of in (("tps", mode), ("free_tps", "free")):
            rates = [rate_over(r, count) for r in results if r["mode"] == of]
            matched[name] = statistics.median(rates) if None not in rates else None
        for name, of in (("median_gap_us", mode), ("free_median_gap_us", "free")):
            matched[name] = statistics.median(median_gap(r, count) for r in results if r["mode"] == of)
        matched["median_gap_ratio_to_free"] = matched["median_gap_us"] / matched["free_median_gap_us"]
        if matched["tps"] and matched["free_tps"]:
            matched["ratio_to_free"] = matched["tps"] / matched["free_tps"]
            paired = [rate_over(one[mode], count) / rate_over(one["free"], count) for one in rounds]
            matched["paired_ratio_to_free"] = statistics.median(paired)
            matched["paired_ratio_quartiles"] = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired
        table[mode]["matched"] = matched
    return table


def concurrent(args):
    """Rounds of two streams started together, `free + free` and `json_schema + free` in turn; both
    compared over the first K tokens, K being the shortest schema answer less one, so that both
    streams ran through that stretch and at the same context lengths."""
    pairs = {"free+free": ("free", "free"), "json_schema+free": ("json_schema", "free")}
    runs = {name: [] for name in pairs}
    for round_index in range(args.rounds * 2):
        name = list(pairs)[round_index % 2]
        outcomes = [None, None]

        def run(slot, mode):
            outcomes[slot] = request(args.port, args.model, mode, args.max_tokens)

        threads = [threading.Thread(target=run, args=(slot, mode)) for slot, mode in enumerate(pairs[name])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        runs[name].append(outcomes)
    count = min(len(outcomes[0]["chunks"]) for outcomes in runs["json_schema+free"]) - 1
    table = {"first_tokens": count}
    for name, outcomes in runs.items():
        table[name] = {
            f"{slot}_{field}": statistics.median(measure(one[index], count) for one in outcomes)
            for index, slot in enumerate(("first", "second"))
            for field, measure in (("tps", rate_over), ("median_gap_us", median_gap))
        }
    free_neighbour, schema_neighbour = table["free+free"], table["json_schema+free"]
    table["free_stream_ratio_schema_neighbour_to_free_neighbour"] = {
        "tps": schema_neighbour["second_tps"] / free_neighbour["second_tps"],
        "median_gap": schema_neighbour["second_median_gap_us"] / free_neighbour["second_median_gap_us"],
    }
    return table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=8, help="requests per mode")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--log", help="the node's log file, for the engine's per-generation figures")
    parser.add_argument("--concurrent", action="store_true", help="also two streams at once")
    args = parser.parse_args()
    report = {"sequential": sequential(args)}
    if args.concurrent:
        report["concurrent"] = concurrent(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
