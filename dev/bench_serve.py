"""
Load a running server (python -m scripts.chat_web) with N concurrent streaming chat clients; prints one JSON line.

    python -m dev.bench_serve --url http://127.0.0.1:8000 --clients 1,8,32 --rounds 2
    python -m dev.bench_serve --clients 32 --duration 60 --malformed-per-second 20 --server-pid PID   # soak

Each client sends streaming /v1/chat/completions requests back to back (greedy unless --temperature, a fixed
--max-tokens; the reply stops early only at the model's end of turn). Per concurrency level: total completion
tok/s (usage tokens / wall time), time to first token and request latency p50/p99, errors. Levels are run in
turns (--rounds) so a busy machine slows them alike; "speedup" is each level's tok/s over the first level's.
--malformed-per-second adds a stream of bad requests (broken JSON, wrong types, oversized bodies) and counts
their statuses: any 5xx or refused connection is an error. --server-pid reports the server's RSS before/after.
"""

import argparse
import json
import random
import statistics
import threading
import time

import psutil
import requests

QUESTIONS = ["What is the capital of France?", "Tell me a short story about a robot.", "Why is the sky blue?",
             "Write a haiku about the sea.", "What is 12 times 7?", "Explain what a neural network is.",
             "How do I boil an egg?", "Name three colors."]
MALFORMED = [b"{", b"[]", b'{"messages": "hi"}', b'{"messages": [{"role": "user", "content": 5}]}',
             b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
             b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', b"\xff\xfe\x00",
             b'{"messages": [{"role": "user", "content": "' + b"x" * 1_200_000 + b'"}]}']


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))], 4)


def one_request(url, headers, args, rng):
    body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if args.model:
        body["model"] = args.model
    start = time.perf_counter()
    first, tokens = None, 0
    with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                                     for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - start, tokens


def run_level(url, headers, args, clients):
    ttfts, latencies, errors, tokens = [], [], [], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + args.duration if args.duration else None

    def client(seed):
        rng = random.Random(seed)
        done = 0
        while (stop_at is None and done < args.requests_per_client) or (stop_at and time.monotonic() < stop_at):
            try:
                first, latency, n = one_request(url, headers, args, rng)
                with lock:
                    ttfts.append(first if first is not None else latency)
                    latencies.append(latency)
                    tokens[0] += n
            except Exception as e:
                with lock:
                    errors.append(str(e)[:200])
            done += 1
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "completion_tokens": tokens[0], "wall_s": round(wall, 2),
            "tok_per_s": round(tokens[0] / wall, 1), "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99), "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99), "errors": len(errors), "first_errors": errors[:3]}


def malformed_stream(url, headers, per_second, stop, counts):
    rng = random.Random(0)
    while not stop.is_set():
        path = rng.choice(["/v1/chat/completions", "/v1/completions", "/chat/completions"])
        try:
            status = requests.post(url + path, data=rng.choice(MALFORMED), timeout=30,
                                   headers={**headers, "Content-Type": "application/json"}).status_code
        except requests.RequestException as e:
            status = f"failed: {type(e).__name__}"
        counts[str(status)] = counts.get(str(status), 0) + 1
        stop.wait(1.0 / per_second)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrency levels")
    parser.add_argument("--rounds", type=int, default=1, help="run the levels this many times, in turns")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends")
    parser.add_argument("--duration", type=float, default=0, help="instead: each client loops for this many seconds")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    parser.add_argument("--model", default=None, help="model id to send (default: none, the server's)")
    parser.add_argument("--api-key", default=None, help="bearer key, if the server wants one")
    parser.add_argument("--malformed-per-second", type=float, default=0, help="also send bad requests at this rate")
    parser.add_argument("--server-pid", type=int, default=None, help="report this process's RSS before and after")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    levels = [int(c) for c in args.clients.split(",")]
    process = psutil.Process(args.server_pid) if args.server_pid else None
    rss_start = process.memory_info().rss if process else None
    stop, malformed = threading.Event(), {}
    side = None
    if args.malformed_per_second > 0:
        side = threading.Thread(target=malformed_stream, args=(url, headers, args.malformed_per_second, stop, malformed))
        side.start()
    runs = {level: [] for level in levels}
    for _ in range(args.rounds):
        for level in levels:
            runs[level].append(run_level(url, headers, args, level))
    stop.set()
    if side:
        side.join()
    results = []
    for level in levels:
        best = max(runs[level], key=lambda r: r["tok_per_s"])
        best["tok_per_s_all_rounds"] = [r["tok_per_s"] for r in runs[level]]
        best["errors"] = sum(r["errors"] for r in runs[level])
        results.append(best)
    base = statistics.median(results[0]["tok_per_s_all_rounds"]) or 1.0
    for r in results:
        r["speedup_vs_first_level"] = round(statistics.median(r["tok_per_s_all_rounds"]) / base, 2)
    out = {"url": url, "max_tokens": args.max_tokens, "levels": results}
    if malformed:
        out["malformed_statuses"] = malformed
    if process:
        out["server_rss_mb_start"] = round(rss_start / 2**20, 1)
        out["server_rss_mb_end"] = round(process.memory_info().rss / 2**20, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
