"""Fleet benchmark: multi-turn conversations over 2 Encore replicas, 4 configurations.

    python bench/fleet.py                                  # SmolLM2 on the CPU, small scale
    python bench/fleet.py --engine-args "--model llama-3-8b --load-format dummy \\
        --dtype bfloat16 --device cuda --gpu-memory-utilization 0.42" --users 32 --turns 6

Every configuration starts its own processes: two replicas (``encore serve``), a fresh
``redis-server`` for the remote tier where the configuration has one, and, where it has one,
the router in front (``--router``: vllm-router; ``--router-policy sticky_least_loaded`` puts a
new conversation's ``X-Session-ID`` on the replica with the fewest and keeps it there;
docs/operations.md "A fleet"):

    rr             round-robin over the replicas (client side), no remote tier
    rr+remote      round-robin, both replicas on one remote tier (shared secret)
    router         the router keeps a conversation on one replica, no remote tier
    router+remote  the router, and the remote tier covers the rest

Users hold conversations of ``--turns`` turns; each turn's prompt is the whole conversation
so far plus a new question (``/v1/completions``, streamed, greedy) and carries
``prompt_cache_key`` and ``X-Session-ID``. A user's next turn starts ``--think-s`` after its
last answer; ``--concurrency`` users are active at once. Reports TTFT p50/p99, the prompt
tokens reused per tier (the replicas' ``encore:kv_tier_hit_tokens_total``) and output tok/s.
Prints one table last; ``--json`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CONFIGS = ("rr", "rr+remote", "router", "router+remote")
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"]
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    name: str
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    hits: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        q = statistics.quantiles(self.ttft, n=100) if len(self.ttft) > 1 else [0.0] * 99
        return {"config": self.name, "requests": len(self.ttft), "errors": self.errors,
                "ttft_p50_ms": 1e3 * statistics.median(self.ttft) if self.ttft else 0.0,
                "ttft_p99_ms": 1e3 * q[98], "output_tok_s": self.output_tokens / self.wall_s,
                **{f"hit_{k}": v for k, v in sorted(self.hits.items())}}


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{what} did not become healthy in {timeout_s:.0f} s")


class Fleet:
    """The processes of one configuration; ``stop`` ends them all."""

    def __init__(self, args: argparse.Namespace, name: str, tmp: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.args, self.tmp = args, tmp
        remote_args: list[str] = []
        if name.endswith("+remote"):
            remote_args = ["--remote-cache-url", self._store(),
                           "--checkpoint-interval-s", str(args.checkpoint_interval_s)]
        secret = tmp / "secret"
        secret.write_text("the fleet benchmark's shared secret\n")
        self.replicas = [self._replica(i, [*remote_args, "--deployment-secret-file",
                                           str(secret)]) for i in range(2)]
        for url, proc in zip(self.replicas, self.procs[-2:], strict=True):
            wait_http(url + "/health", proc, args.start_timeout_s, "a replica")
        self.entry = self._router() if name.startswith("router") else None

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "w")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "TRITON_INTERPRET": ""})
        self.procs.append(proc)
        return proc

    def _store(self) -> str:
        binary = shutil.which("valkey-server") or shutil.which("redis-server")
        if binary is None:
            sys.exit("the remote configurations need redis-server (or valkey-server)")
        port = free_port()
        self._spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.tmp), "--maxmemory",
                     f"{self.args.store_mb}mb", "--maxmemory-policy", "allkeys-lru"],
                    "store.log")
        time.sleep(0.5)
        return f"redis://127.0.0.1:{port}/0"

    def _replica(self, i: int, extra: list[str]) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "encore.server.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), *shlex.split(self.args.engine_args), *extra]
        self._spawn(cmd, f"replica{i}.log")
        return f"http://127.0.0.1:{port}"

    def _router(self) -> str:
        port = free_port()
        cmd = [*shlex.split(self.args.router), "--worker-urls", *self.replicas,
               "--policy", self.args.router_policy, "--host", "127.0.0.1", "--port", str(port),
               "--worker-startup-check-interval", "1", "--prometheus-host", "127.0.0.1",
               "--prometheus-port", str(free_port())]
        proc = self._spawn(cmd, "router.log")
        wait_http(f"http://127.0.0.1:{port}/health", proc, 120, "the router")
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        """Router first, then the replicas (which flush to the store), the store last."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()


def hit_tokens(urls: list[str]) -> dict[str, float]:
    """Prompt tokens reused per tier (without tiers: all on the device), and in all, summed
    over the replicas; with a remote tier also the MB written to and read from it."""
    out: dict[str, float] = {}
    for url in urls:
        text = httpx.get(url + "/metrics", timeout=30).text
        for route, key in (('dst="remote",src="device"', "remote_mb_written"),
                           ('dst="device",src="remote"', "remote_mb_read")):
            m = re.search(r"^encore:kv_tier_transfer_bytes_total\{" + route + r"\} (\S+)$",
                          text, re.M)
            if m:
                out[key] = out.get(key, 0.0) + float(m.group(1)) / 2**20
        total = re.search(r"^encore:prefix_cache_hits_total (\S+)$", text, re.M)
        out["total"] = out.get("total", 0.0) + float(total.group(1) if total else 0.0)
        tiers = re.findall(r'^encore:kv_tier_hit_tokens_total\{tier="(\w+)"\} (\S+)$',
                           text, re.M)
        for tier, value in tiers or [("device", total.group(1) if total else "0")]:
            out[tier] = out.get(tier, 0.0) + float(value)
    return out


# ---------------------------------------------------------------------------- workload
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def turn(client: httpx.AsyncClient, base: str, user: str, prompt: str,
               args: argparse.Namespace, result: Result) -> str:
    # logprobs: every token streams a chunk, text or not (a dummy model's ids may be past
    # its tokenizer's vocabulary); the usage chunk counts the tokens
    body = {"model": args.model_name, "prompt": prompt, "max_tokens": args.output_len,
            "temperature": 0, "stream": True, "ignore_eos": True, "prompt_cache_key": user,
            "logprobs": 1, "stream_options": {"include_usage": True}}
    start, first, text = time.perf_counter(), None, []
    try:
        async with client.stream("POST", base + "/v1/completions", json=body,
                                 headers={"X-Session-ID": user}) as r:
            if r.status_code != 200:
                result.errors += 1
                return ""
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    first = first or time.perf_counter()
                    text.append(chunk["choices"][0].get("text") or "")
                if chunk.get("usage"):
                    result.output_tokens += chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        result.errors += 1
        return ""
    result.ttft.append((first or time.perf_counter()) - start)
    return "".join(text)


async def conversation(i: int, client: httpx.AsyncClient, entry: list[str], counter: list[int],
                       args: argparse.Namespace, result: Result) -> None:
    rng = random.Random(args.seed * 1000 + i)
    user = f"user-{i}"
    prompt = f"Conversation {i}. " + words(rng, args.system_words)
    for _ in range(args.turns):
        prompt += "\nQ: " + words(rng, args.user_words) + "\nA:"
        base = entry[counter[0] % len(entry)]  # round-robin, or the router's one address
        counter[0] += 1
        prompt += await turn(client, base, user, prompt, args, result)
        await asyncio.sleep(args.think_s)


async def drive(entry: list[str], args: argparse.Namespace, result: Result) -> None:
    sem = asyncio.Semaphore(args.concurrency)
    counter = [0]
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(i: int) -> None:
            async with sem:
                await conversation(i, client, entry, counter, args, result)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.users)))
        result.wall_s = time.perf_counter() - start


def warm_up(urls: list[str], args: argparse.Namespace) -> None:
    """Each replica compiles and caches its kernels on its first prompts of each size: run a
    few before timing (prompts unlike the workload's, so they leave no useful cache)."""
    async def go() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            sink = Result("warm-up")
            for url in urls:
                for n in (50, args.system_words, 4 * args.system_words):
                    await turn(client, url, "warm-up", f"Warm-up {n}: " + "zulu " * n, args,
                               sink)

    asyncio.run(go())


def run_config(name: str, args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"fleet-{name.replace('+', '-')}-") as tmp:
        fleet = Fleet(args, name, Path(tmp))
        try:
            entry = [fleet.entry] if fleet.entry else fleet.replicas
            models = httpx.get(fleet.replicas[0] + "/v1/models", timeout=30).json()
            args.model_name = models["data"][0]["id"]
            warm_up(fleet.replicas, args)
            before = hit_tokens(fleet.replicas)
            result = Result(name)
            asyncio.run(drive(entry, args, result))
            after = hit_tokens(fleet.replicas)
            result.hits = {k: v - before.get(k, 0.0) for k, v in after.items()}
            return result
        finally:
            fleet.stop()
            if args.logs:
                shutil.copytree(tmp, Path(args.logs) / name.replace("+", "-"),
                                dirs_exist_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--engine-args", default="--config cpu-small --num-threads 1",
                   help="flags for each replica's `encore serve`")
    p.add_argument("--router", default=f"{sys.executable} -m vllm_router.launch_router",
                   help="the router command (before --worker-urls ...)")
    p.add_argument("--router-policy", default="sticky_least_loaded",
                   help="vllm-router's policy: consistent_hash or sticky_least_loaded (both "
                        "keep an X-Session-ID on one replica)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--system-words", type=int, default=300)
    p.add_argument("--user-words", type=int, default=40)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--think-s", type=float, default=0.5)
    p.add_argument("--checkpoint-interval-s", type=float, default=1.0)
    p.add_argument("--store-mb", type=int, default=2048)
    p.add_argument("--start-timeout-s", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--logs", default=None, help="copy each configuration's logs here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        rows.append(run_config(name, args).row())
        print(json.dumps(rows[-1]), flush=True)  # each configuration as it finishes
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    keys = sorted({k for r in rows for k in r})
    keys = ["config", *[k for k in keys if k != "config"]]
    print("| " + " | ".join(keys) + " |")
    print("|---" * len(keys) + "|")
    for r in rows:
        print("| " + " | ".join(f"{r.get(k, 0):.1f}" if isinstance(r.get(k, 0), float)
                                else str(r.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
