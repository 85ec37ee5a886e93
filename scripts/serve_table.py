"""What the HTTP server costs, measured side by side in one process on the real stories260K bundle:

    direct      generate() on a runtime, no server (the floor)
    http x1     one client after another through /v1/completions (max_concurrency 1)
    http 8c/1s  8 concurrent clients, 1 generation slot (the other 7 wait in the queue)
    http 8c/2s  8 concurrent clients, 2 slots (one runtime each, 1 thread each)

Rounds alternate between the modes so a noisy, shared CPU hits them alike; medians over rounds are reported.
Run by hand:  .venv/bin/python scripts/serve_table.py [--rounds 3] [--tokens 32]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = ["Once upon a time", "The cat sat", "Lily was happy because", "One day, a big dog"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8, help="requests per mode per round")
    a = ap.parse_args()

    import httpx

    from edgepack.deploy.bundle import make_bundle
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.serve import BackgroundServer
    from edgepack.deploy.serve_engine import ServeConfig, load_served
    from edgepack.output import print_table
    from edgepack.targets import load_target

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    bundle = make_bundle(a.model, load_target("cpu-x86-64"), tmp / "b")
    cfgs = {"http x1": ServeConfig(port=_port(), max_concurrency=1, queue=64, threads=1),
            "http 8c/1s": ServeConfig(port=_port(), max_concurrency=1, queue=64, threads=1),
            "http 8c/2s": ServeConfig(port=_port(), max_concurrency=2, queue=64, threads=1)}
    served = {k: load_served(bundle, c) for k, c in cfgs.items()}
    direct = load_served(bundle, ServeConfig(threads=1))
    body = lambda i: {"prompt": PROMPTS[i % 4], "max_tokens": a.tokens, "temperature": 0}  # noqa: E731
    servers = {k: BackgroundServer(served[k], cfgs[k]) for k in cfgs}
    urls = {k: s.__enter__() for k, s in servers.items()}
    results: dict[str, list[dict]] = {k: [] for k in ["direct", *cfgs]}
    try:
        for _ in range(a.rounds):
            rt = direct.pool.get()
            t0, lat = time.perf_counter(), []
            for i in range(a.requests):
                t = time.perf_counter()
                ids = direct.tokenizer(PROMPTS[i % 4])["input_ids"]
                generate(rt, ids, GenerationConfig(max_new_tokens=a.tokens))
                lat.append(time.perf_counter() - t)
            direct.pool.put(rt)
            results["direct"].append({"wall": time.perf_counter() - t0, "lat": lat, "tokens": a.tokens * a.requests})

            t0, lat, toks = time.perf_counter(), [], 0
            with httpx.Client(timeout=600) as c:
                for i in range(a.requests):
                    t = time.perf_counter()
                    r = c.post(urls["http x1"] + "/v1/completions", json=body(i)).json()
                    lat.append(time.perf_counter() - t)
                    toks += r["usage"]["completion_tokens"]
            results["http x1"].append({"wall": time.perf_counter() - t0, "lat": lat, "tokens": toks})

            for k in ("http 8c/1s", "http 8c/2s"):
                async def burst(url):
                    async with httpx.AsyncClient(timeout=600) as c:
                        async def one(i):
                            t = time.perf_counter()
                            r = (await c.post(url + "/v1/completions", json=body(i))).json()
                            return time.perf_counter() - t, r["usage"]["completion_tokens"]
                        return await asyncio.gather(*[one(i) for i in range(a.requests)])

                t0 = time.perf_counter()
                out = asyncio.run(burst(urls[k]))
                results[k].append({"wall": time.perf_counter() - t0, "lat": [x[0] for x in out],
                                   "tokens": sum(x[1] for x in out)})
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)

    rows, summary = [], {}
    base = statistics.median(r["tokens"] / r["wall"] for r in results["direct"])
    for k, rs in results.items():
        tps = statistics.median(r["tokens"] / r["wall"] for r in rs)
        p50 = statistics.median(statistics.median(r["lat"]) for r in rs)
        p95 = statistics.median(sorted(r["lat"])[max(0, int(0.95 * len(r["lat"])) - 1)] for r in rs)
        summary[k] = {"tokens_per_s": round(tps, 2), "latency_p50_s": round(p50, 4), "latency_p95_s": round(p95, 4),
                      "vs_direct": round(tps / base, 3)}
        rows.append([k, f"{tps:.1f}", f"{p50 * 1000:.0f}", f"{p95 * 1000:.0f}", f"{tps / base:.2f}x"])
    print_table(f"serve overhead: stories260K, {a.requests} requests x {a.tokens} tokens, median of {a.rounds} rounds",
                ["mode", "aggregate tok/s", "latency p50 ms", "latency p95 ms", "vs direct"], rows)
    print(json.dumps({"bench": "serve_table", "model": a.model, "tokens": a.tokens, "requests": a.requests,
                      "rounds": a.rounds, "results": summary}))


if __name__ == "__main__":
    main()
