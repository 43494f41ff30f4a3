"""Load generator for any OpenAI-compatible endpoint (Encore, vLLM, SGLang, ...).

    python bench/serve.py --base-url http://127.0.0.1:8000/v1 --num-prompts 200 \\
        --request-rate 4 --input-len 256 --output-len 64 --json out.json --plot out.png

Arrivals are Poisson at ``--request-rate`` req/s (inf = all at once), optionally capped at
``--concurrency`` in flight. Prompts are random words of about ``--input-len`` tokens, or
lines of a text/JSONL ``--dataset``. Streams every request (``/v1/completions`` or, with
``--chat``, ``/v1/chat/completions``) and reports TTFT, TPOT, ITL and E2E percentiles plus
request and token throughput. Token counts come from the server's ``usage``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand",
         "part", "child", "eye", "woman", "place", "work", "week", "case", "point",
         "government", "company", "number", "group", "problem", "fact"]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


def make_prompts(args: argparse.Namespace, rng: random.Random) -> list[str]:
    if args.dataset:
        path = Path(args.dataset)
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if path.suffix == ".jsonl":
            rows = [json.loads(ln) for ln in lines]
            lines = [r.get("prompt") or r.get("text", "") for r in rows]
        return [rng.choice(lines) for _ in range(args.num_prompts)]
    # ~1 token per common English word with a leading space
    return [" ".join(rng.choice(WORDS) for _ in range(args.input_len))
            for _ in range(args.num_prompts)]


def request_body(args: argparse.Namespace, prompt: str) -> tuple[str, dict]:
    body = {"model": args.model, "max_tokens": args.output_len, "stream": True,
            "temperature": args.temperature, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.chat:
        return "/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/completions", {**body, "prompt": prompt}


def _delta_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace,
                      prompt: str) -> Result:
    path, body = request_body(args, prompt)
    start = time.perf_counter()
    last = start
    res = Result(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))[:200]
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if _delta_text(chunk):
                    chunks += 1
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = True
        if not res.output_tokens:  # no usage in the stream (some servers): one token a chunk
            res.output_tokens = chunks
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def run(args: argparse.Namespace,
              prompts: list[str] | None = None) -> tuple[list[Result], float]:
    """Send ``prompts`` (default: ``make_prompts``) as ``args`` says; (results, seconds)."""
    rng = random.Random(args.seed)
    prompts = make_prompts(args, rng) if prompts is None else prompts
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    sem = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), unit="req", disable=args.no_progress)
    except ImportError:
        bar = None

    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        if not args.model:
            args.model = (await client.get("/models")).json()["data"][0]["id"]

        async def guarded(prompt: str) -> Result:
            if sem is None:
                res = await one_request(client, args, prompt)
            else:
                async with sem:
                    res = await one_request(client, args, prompt)
            if bar is not None:
                bar.update(1)
            return res

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(guarded(prompt)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return results, duration


def percentiles(values: list[float], ps=(50, 90, 95, 99)) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out = {"mean": statistics.fmean(s)}
    for p in ps:
        out[f"p{p}"] = s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]
    return out


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_token_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "ttft_s": percentiles([r.ttft for r in ok]), "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }


def print_summary(s: dict) -> None:
    print(f"completed {s['completed']}  failed {s['failed']}  in {s['duration_s']:.2f}s")
    print(f"request throughput   {s['request_throughput']:.2f} req/s")
    print(f"output throughput    {s['output_token_throughput']:.1f} tok/s "
          f"(total {s['total_token_throughput']:.1f} tok/s)")
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        row = "  ".join(f"{k} {v * 1000:8.1f}" for k, v in s[key].items())
        print(f"{key[:-2].upper():5s} ms  {row}")
    for err in s["errors"]:
        print(f"error: {err}")


def plot(results: list[Result], out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
        return
    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, values) in zip(axes, [("TTFT (s)", [r.ttft for r in ok]),
                                          ("ITL (s)", [x for r in ok for x in r.itl]),
                                          ("E2E (s)", [r.e2e for r in ok])], strict=True):
        ax.hist(values, bins=40)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    print(f"plot written to {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="", help="default: the first model the server lists")
    p.add_argument("--api-key", default="")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in req/s (inf: all at once)")
    p.add_argument("--concurrency", type=int, default=0, help="cap on requests in flight")
    p.add_argument("--input-len", type=int, default=128, help="random prompt length (words)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dataset", default="", help="text file (one prompt a line) or JSONL")
    p.add_argument("--chat", action="store_true", help="use /chat/completions")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", dest="json_out", default="", help="write results as JSON here")
    p.add_argument("--plot", default="", help="write latency histograms to this PNG")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results, duration = asyncio.run(run(args))
    summary = summarize(results, duration)
    print_summary(summary)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"args": vars(args) | {"request_rate": str(args.request_rate)}, "summary": summary,
             "requests": [asdict(r) for r in results]}, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
