"""Soak test: many concurrent streams against one server for a bounded time.

    python bench/soak.py                          # starts `encore serve --config cpu-small`
    python bench/soak.py --streams 64 --duration-s 300 --json soak.json
    python bench/soak.py --base-url http://127.0.0.1:8000 --pid 1234   # a running server

``--streams`` clients each send streamed chat completions back to back (mixed prompts, some
sharing a system prompt, some with a prompt_cache_key, some aborted mid-stream) until
``--duration-s`` has passed. Reports errors by kind, TTFT and end-to-end p50/p99, the RSS of
the server and each of its child processes at the start and the end, and checks that once
the load stops the engine returns to idle: no request running or waiting, no KV block in use
(``encore:kv_cache_usage_perc`` 0, after each agent program's last step has dropped its
TTL pin). Exits 1 if it does not, or if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = 8  # agent programs among the streams (prompt_cache_key)
WORDS = ["harbor", "lumen", "quartz", "saddle", "tundra", "velvet", "wicker", "yonder",
         "zinnia", "amber", "bishop", "cobalt"]


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    aborted: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (P0, P1, P2)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            children = (task / "children").read_text().split()
            todo.extend(int(c) for c in children)
    return out


def rss_table(pid: int) -> dict[str, float]:
    return {f"pid {p}": rss_mib(p) for p in process_tree(pid)}


def body(rng: random.Random, i: int, model: str) -> dict:
    system = "You are a terse assistant. " + " ".join(WORDS) * (1 + i % 3)
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
    b = {"model": model, "stream": True, "max_tokens": rng.randint(4, 48),
         "messages": [{"role": "system", "content": system},
                      {"role": "user", "content": question}],
         "temperature": rng.choice([0.0, 0.7])}
    if i % 4 == 0:  # an agent program: its KV stays pinned between turns
        b["prompt_cache_key"] = f"soak-program-{i % PROGRAMS}"
    return b


async def one(client: httpx.AsyncClient, url: str, b: dict, abort_after: int | None,
              stats: Stats) -> None:
    start, first, chunks = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", url, json=b) as r:
            if r.status_code != 200:
                stats.error(f"http {r.status_code}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if '"error"' in line and '"choices"' not in line:
                    stats.error("error event")
                    return
                choices = json.loads(line[6:]).get("choices") or [{}]
                if not choices[0].get("delta", {}).get("content"):
                    continue  # the opening role chunk, or the closing one: not a token
                first = first or time.perf_counter()
                chunks += 1
                if abort_after is not None and chunks >= abort_after:
                    stats.aborted += 1  # leaving the stream aborts the request
                    return
    except httpx.HTTPError as e:
        stats.error(type(e).__name__)
        return
    stats.ttft.append((first or time.perf_counter()) - start)
    stats.e2e.append(time.perf_counter() - start)


async def stream_loop(i: int, client: httpx.AsyncClient, base: str, model: str,
                      deadline: float, stats: Stats) -> None:
    rng = random.Random(i)
    while time.monotonic() < deadline:
        abort_after = rng.randint(1, 3) if rng.random() < 0.1 else None
        await one(client, base + "/v1/chat/completions", body(rng, i, model), abort_after,
                  stats)


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


async def soak(base: str, args: argparse.Namespace) -> Stats:
    stats = Stats()
    model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
    deadline = time.monotonic() + args.duration_s
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(stream_loop(i, client, base, model, deadline, stats)
                               for i in range(args.streams)))
        for k in range(PROGRAMS):  # each agent program's last step: its KV pin is dropped
            b = body(random.Random(k), 0, model)
            b.update(prompt_cache_key=f"soak-program-{k}", is_last_step=True, max_tokens=2)
            await one(client, base + "/v1/chat/completions", b, None, stats)
    return stats


def idle_after(base: str, timeout_s: float) -> dict[str, float]:
    """The engine's gauges once the load stopped (waits for them to reach idle)."""
    names = ("encore:num_requests_running", "encore:num_requests_waiting",
             "encore:kv_cache_usage_perc")
    deadline = time.monotonic() + timeout_s
    while True:
        values = {n: metric(base, n) for n in names}
        if all(v == 0 for v in values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = 18000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "encore.server.cli", "serve", "--port", str(port),
           *args.server_args.split()]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TRITON_INTERPRET": ""})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start")


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] * 1e3 if values else 0.0
    return statistics.quantiles(values, n=100)[q - 1] * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None, help="a running server (else one is started)")
    p.add_argument("--pid", type=int, default=None, help="its process id (for RSS)")
    p.add_argument("--server-args", default="--config cpu-small")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=120.0)
    p.add_argument("--idle-timeout-s", type=float, default=60.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    proc = None
    if args.base_url is None:
        proc, base = start_server(args)
        pid = proc.pid
    else:
        base, pid = args.base_url.rstrip("/"), args.pid
    try:
        before = rss_table(pid) if pid else {}
        stats = asyncio.run(soak(base, args))
        idle = idle_after(base, args.idle_timeout_s)
        after = rss_table(pid) if pid else {}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    report = {"streams": args.streams, "duration_s": args.duration_s,
              "requests": len(stats.e2e), "aborted": stats.aborted, "errors": stats.errors,
              "ttft_p50_ms": pct(stats.ttft, 50), "ttft_p99_ms": pct(stats.ttft, 99),
              "e2e_p50_ms": pct(stats.e2e, 50), "e2e_p99_ms": pct(stats.e2e, 99),
              "rss_mib_start": before, "rss_mib_end": after, "after_load": idle}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = not stats.errors and all(v == 0 for v in idle.values())
    print("soak:", "OK" if ok else "FAILED (errors, or the engine did not return to idle)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
