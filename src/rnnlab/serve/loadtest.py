"""A bounded load test of a running `rnnlab serve`: a fixed number of generate and score requests sent by N
concurrent clients (one keep-alive connection each), stopped early at a time limit. Prints the latency
percentiles and throughput of each kind of request. Standard library only.

    python -m rnnlab.serve.loadtest http://127.0.0.1:8000/ --requests 200 --concurrency 8 --num-preds 100
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

SCORE_TEXT = ("The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite "
              "matter to us. His grey eyes shone and twinkled, and his usually pale face was flushed and "
              "animated. The fire burned brightly, and the soft radiance of the incandescent lights in the lilies "
              "of silver caught the bubbles that flashed and passed in our glasses. ")


class Client:
    """One keep-alive connection; reconnects after an error."""

    def __init__(self, url: str, timeout: float):
        self.parts, self.timeout, self.conn = urllib.parse.urlsplit(url), timeout, None

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        for attempt in (0, 1):                    # a kept-alive connection the server closed: open a new one
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port or 80,
                                                       timeout=self.timeout)
            try:
                self.conn.request("POST", path, data, {"Content-Type": "application/json"})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def jobs(args) -> list[tuple[str, dict]]:
    """The requests, generate and score interleaved in a fixed shuffled order."""
    out = [("generate", {"num_preds": args.num_preds, "seed": i, **({"prompt": args.prompt} if args.prompt else {})})
           for i in range(args.requests)]
    text = (SCORE_TEXT * (args.score_chars // len(SCORE_TEXT) + 1))[:args.score_chars]
    out += [("score", {"text": text, "top": 5})] * args.score_requests
    random.Random(0).shuffle(out)
    return out


def run(args) -> dict:
    todo, lock, results = iter(jobs(args)), threading.Lock(), []
    deadline = time.monotonic() + args.duration
    local = threading.local()

    def worker() -> None:
        local.client = Client(args.url, args.timeout)
        while time.monotonic() < deadline:
            with lock:
                job = next(todo, None)
            if job is None:
                return
            kind, body = job
            start = time.perf_counter()
            try:
                status, payload = local.client.post(f"/v1/{kind}", body)
            except (http.client.HTTPException, OSError) as e:
                status, payload = 0, str(e).encode()
            elapsed = time.perf_counter() - start
            chars = 0
            if status == 200 and kind == "generate":
                reply = json.loads(payload)
                chars = sum(len(s) - len(reply["prompt"]) for s in reply["samples"])
            results.append((kind, status, elapsed, chars))

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(args.concurrency)]:
            f.result()
    wall = time.perf_counter() - started
    report = {"url": args.url, "concurrency": args.concurrency, "wall_s": wall, "requests": len(results),
              "req_per_s": len(results) / wall, "kinds": {}}
    for kind in ("generate", "score"):
        rows = [r for r in results if r[0] == kind]
        if not rows:
            continue
        ok = sorted(r[2] for r in rows if r[1] == 200)
        statuses = {}
        for r in rows:
            statuses[str(r[1])] = statuses.get(str(r[1]), 0) + 1
        report["kinds"][kind] = {
            "requests": len(rows), "statuses": statuses, "req_per_s": len(rows) / wall,
            **{f"p{q}_ms": 1000 * percentile(ok, q) for q in (50, 90, 99)},
            "max_ms": 1000 * max(ok) if ok else math.nan,
            **({"generated_chars_per_s": sum(r[3] for r in rows) / wall} if kind == "generate" else {})}
    return report


def describe(url: str, timeout: float) -> str:
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port,
                                      timeout=timeout)
    conn.request("GET", "/v1/model")
    info = json.loads(conn.getresponse().read())
    a = info["architecture"]
    return (f"{a['cell']} {a['num_layers']}x{a['num_hiddens']}, {info['num_params']:,} parameters, vocab "
            f"{info['vocab']['size']}, corpus {info['data']['corpus']}; server limits: "
            f"max_concurrent {info['limits']['max_concurrent']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rnnlab.serve.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8000/", help="the server (default: %(default)s)")
    p.add_argument("--requests", type=int, default=200, help="generate requests (default: %(default)s)")
    p.add_argument("--num-preds", type=int, default=100, help="characters each generates (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt (default: the model's own)")
    p.add_argument("--score-requests", type=int, default=50, help="score requests (default: %(default)s)")
    p.add_argument("--score-chars", type=int, default=500, help="characters each scores (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="clients at once (default: %(default)s)")
    p.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds "
                                                                 "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    try:
        model = describe(args.url, args.timeout)
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        print(f"loadtest: error: no rnnlab server at {args.url}: {e}", file=sys.stderr)
        return 1
    report = run(args)
    report["model"] = model
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{model}\n{report['requests']} requests in {report['wall_s']:.1f} s at concurrency {args.concurrency}: "
          f"{report['req_per_s']:.1f} req/s")
    for kind, k in report["kinds"].items():
        extra = f", {k['generated_chars_per_s']:,.0f} generated chars/s" if kind == "generate" else ""
        print(f"  {kind:<8} {k['requests']:>4} requests {k['statuses']}  p50 {k['p50_ms']:.0f} ms  "
              f"p90 {k['p90_ms']:.0f} ms  p99 {k['p99_ms']:.0f} ms  max {k['max_ms']:.0f} ms  "
              f"{k['req_per_s']:.1f} req/s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
