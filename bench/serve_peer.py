"""Encore and ``transformers serve`` on the same card and the same checkpoint, side by side.

    python bench/serve_peer.py --ckpt /tmp/ckpt8b --out $OUT/peer          # GPU, llama-3-8b
    python bench/serve_peer.py --shape tiny --device cpu --ckpt /tmp/ckpt-tiny --out /tmp/peer \\
        --concurrency 1,2 --input-len 32 --output-len 16 --min-prompts 2   # the CPU check

1. Writes, once, a random-weight bf16 checkpoint of a preset shape (``--shape``, from
   ``encore/worker/models/presets.py``) to ``--ckpt``: HF Llama ``config.json``, one
   safetensors shard per layer (memory bounded by a shard), matrices ~ N(0, ``--std``), norms
   1, drawn on ``--device``. Its tokenizer is a ``tokenizers`` WordLevel one over the words
   ``w0 .. w{vocab-1}`` (whitespace-split, so a prompt of N such words is N tokens and every
   sampled id decodes) with a chat template that concatenates the messages. The checkpoint has
   **no end-of-sequence token** (``eos_token_id: null`` everywhere): ``transformers serve``
   rejects ``ignore_eos`` (422, unexpected field), so both servers get the same request
   without it and every request runs to ``max_tokens``; each row checks that it did.
2. Starts one server at a time (never two on the GPU): Encore (``--config gpu`` on CUDA:
   Triton attention, decode CUDA graphs, KV pool from free memory), then ``transformers
   serve`` with continuous batching (paged attention over sdpa, or flash attention where
   its package is installed), once per ``--servers`` entry; ``transformers+graphs`` adds
   ``--cb-use-cuda-graph`` (off by default for sdpa). Each waits for ``/health``, then a
   warm-up of ``c`` short requests at each concurrency ``c``.
3. Drives each with ``bench/serve.py`` (streaming ``/v1/completions``, or ``--chat``) at each
   concurrency: ``max(--min-prompts, --waves * c)`` random prompts of ``--input-len`` words,
   ``--output-len`` tokens each, greedy; the same prompts for every server.
4. Prints one table (TTFT p50/p99, ITL p50, output tok/s, Encore / that server's output
   tok/s); ``--out`` gets ``serve_peer.json`` (rewritten after each server) and each server's
   log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import serve  # noqa: E402
from encore.worker.models.arch import ModelArch  # noqa: E402
from encore.worker.models.presets import preset  # noqa: E402

HOST = "127.0.0.1"
STAMP = "serve_peer.json"  # written last: its presence means the checkpoint is complete
INDEX = "model.safetensors.index.json"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
PEER_MODES = {"transformers": ["--continuous-batching"],
              "transformers+graphs": ["--continuous-batching", "--cb-use-cuda-graph"]}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


# ---------------------------------------------------------------- the checkpoint

def shard_plan(arch: ModelArch) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape) of every tensor, one shard per layer plus the embedding and the head."""
    d, inter = arch.hidden_size, arch.intermediate_size
    shards = [[("model.embed_tokens.weight", (arch.vocab_size, d))]]
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        shards.append([
            (p + "self_attn.q_proj.weight", (arch.q_size, d)),
            (p + "self_attn.k_proj.weight", (arch.kv_size, d)),
            (p + "self_attn.v_proj.weight", (arch.kv_size, d)),
            (p + "self_attn.o_proj.weight", (d, arch.q_size)),
            (p + "mlp.gate_proj.weight", (inter, d)),
            (p + "mlp.up_proj.weight", (inter, d)),
            (p + "mlp.down_proj.weight", (d, inter)),
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
        ])
    last = [("model.norm.weight", (d,))]
    if not arch.tie_word_embeddings:
        last.append(("lm_head.weight", (arch.vocab_size, d)))
    return [*shards, last]


def hf_config(arch: ModelArch) -> dict:
    """config.json in the Hugging Face Llama format; no bos/eos/pad ids (see the module doc)."""
    rope = {"rope_type": "default", **(arch.rope_scaling or {}), "rope_theta": arch.rope_theta}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim, "rms_norm_eps": arch.rms_norm_eps,
            "rope_parameters": rope, "max_position_embeddings": arch.max_position_embeddings,
            "tie_word_embeddings": arch.tie_word_embeddings, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "bos_token_id": None,
            "eos_token_id": None, "pad_token_id": None, "dtype": "bfloat16"}


def write_tokenizer(path: Path, arch: ModelArch) -> None:
    """WordLevel over w0..w{V-1}: one token per whitespace-separated word, every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(arch.vocab_size)},
                                     unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
        "model_max_length": arch.max_position_embeddings,
        "clean_up_tokenization_spaces": False}, indent=1))


def write_checkpoint(path: Path, shape: str, device: str, std: float, seed: int) -> None:
    """The random checkpoint, shard by shard (run in a child: its CUDA context dies with it)."""
    import torch
    from safetensors.torch import save_file

    arch, plan = preset(shape), shard_plan(preset(shape))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            t = torch.empty(shp, dtype=torch.bfloat16, device=device)
            if len(shp) == 1:
                t.fill_(1.0)  # norm weights
            else:
                t.normal_(0.0, std, generator=gen)
            tensors[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                          "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(hf_config(arch), indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
         "do_sample": False}, indent=1))
    write_tokenizer(path, arch)
    (path / STAMP).write_text(json.dumps({"shape": shape, "std": std, "seed": seed}))


def ensure_checkpoint(args: argparse.Namespace) -> None:
    """Write ``args.ckpt`` unless a complete checkpoint of ``args.shape`` is there."""
    path = Path(args.ckpt)
    stamp = path / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("shape") == args.shape:
        print(f"checkpoint {path} ({args.shape}) already written")
        return
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.safetensors"), path / INDEX, stamp]:
        old.unlink(missing_ok=True)  # a shard of another shape would be loaded too
    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=write_checkpoint, args=(path, args.shape, args.device, args.std, args.seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the checkpoint failed (exit {child.exitcode})")
    print(f"checkpoint {path} ({args.shape}) written in {time.perf_counter() - t0:.1f}s")


# ---------------------------------------------------------------- the servers

@dataclass(frozen=True)
class Server:
    """A server command; ``name`` labels its rows and its log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]


def encore_server(args: argparse.Namespace, port: int) -> Server:
    where = ["--config", "gpu"] if args.device == "cuda" else ["--device", args.device]
    cmd = [sys.executable, "-m", "encore.server.cli", "serve", *where, "--model", args.ckpt,
           "--served-model-name", args.ckpt, "--dtype", "bfloat16", "--host", HOST,
           "--port", str(port), "--responses-db", str(Path(args.out) / "encore-responses.db"),
           *shlex.split(args.encore_args)]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return Server("encore", cmd, {**os.environ, "PYTHONPATH": pythonpath})


def peer_server(args: argparse.Namespace, port: int, mode: str) -> Server:
    cmd = [args.peer_python, "-m", "transformers.cli.transformers", "serve", args.ckpt,
           *PEER_MODES[mode], "--device", args.device, "--dtype", "bfloat16",
           "--attn-implementation", "sdpa", "--host", HOST, "--port", str(port),
           "--log-level", "info", *shlex.split(args.peer_args)]
    return Server(mode, cmd, {**os.environ, **OFFLINE_ENV})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``url``/health answers 200; RuntimeError if the process exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not healthy after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> float:
    """SIGTERM (SIGKILL after 30 s), then SIGKILL whatever is left of its process group (it
    leads one), so the next server gets the whole GPU; seconds it took."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # no group left: nothing lingers
        os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - t0


# ---------------------------------------------------------------- the load

def prompts_for(vocab: int, input_len: int, n: int, seed: int) -> list[str]:
    """``n`` prompts of ``input_len`` random vocabulary words (no shared prefixes)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab)}" for _ in range(input_len)) for _ in range(n)]


def level(args: argparse.Namespace, url: str, c: int, prompts: list[str],
          output_len: int) -> dict:
    """One ``bench/serve.py`` run at concurrency ``c``: its summary."""
    load = serve.parse_args(["--base-url", url + "/v1", "--model", args.ckpt,
                             "--concurrency", str(c), "--num-prompts", str(len(prompts)),
                             "--output-len", str(output_len), "--no-ignore-eos",
                             "--no-progress", *(["--chat"] if args.chat else [])])
    results, duration = asyncio.run(serve.run(load, prompts))
    return serve.summarize(results, duration)


def measure(args: argparse.Namespace, url: str, vocab: int) -> list[dict]:
    """Warm up at every concurrency, then measure each; one row a concurrency."""
    for c in args.concurrency:
        warm = level(args, url, c, prompts_for(vocab, args.input_len, c, 10_000 + c),
                     min(16, args.output_len))
        if warm["failed"]:
            raise RuntimeError(f"warm-up at concurrency {c} failed: {warm['errors']}")
    rows = []
    for c in args.concurrency:
        n = max(args.min_prompts, args.waves * c)
        s = level(args, url, c, prompts_for(vocab, args.input_len, n, c), args.output_len)
        full = s["failed"] == 0 and s["output_tokens"] == n * args.output_len
        rows.append({"concurrency": c, "num_prompts": n, "full_length": full, "summary": s})
        print(f"  c={c}: {s['output_token_throughput']:.1f} out tok/s, "
              f"{s['completed']}/{n} ok, {s['output_tokens']} tokens")
    return rows


def bench_server(server: Server, args: argparse.Namespace, port: int, vocab: int) -> dict:
    """Start ``server``, measure it, stop it; its record (``error`` set when it failed)."""
    log = Path(args.out) / f"{server.name.replace('+', '-')}.log"
    record: dict = {"server": server.name, "cmd": server.cmd, "log": str(log), "rows": []}
    print(f"{server.name}: starting ({shlex.join(server.cmd)})")
    with log.open("w") as f:
        proc = subprocess.Popen(server.cmd, stdout=f, stderr=subprocess.STDOUT,
                                env=server.env, cwd=REPO, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        record["start_s"] = wait_healthy(url, proc, args.start_timeout)
        print(f"{server.name}: healthy after {record['start_s']:.1f}s")
        record["rows"] = measure(args, url, vocab)
    except (RuntimeError, httpx.HTTPError) as e:
        record["error"] = str(e)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        print(f"{server.name}: FAILED: {e}\n{tail}", file=sys.stderr)
    finally:
        record["stop_s"] = stop(proc)
    return record


# ---------------------------------------------------------------- the table

def table(records: list[dict]) -> str:
    """One line per (server, concurrency); the last column is Encore's output tok/s over
    that row's, at the same concurrency. TPOT is beside ITL because a server that writes
    several tokens in one network write shows near-zero ITLs between them."""
    enc = {r["concurrency"]: r["summary"]["output_token_throughput"]
           for rec in records if rec["server"] == "encore" for r in rec["rows"]}
    lines = [f"{'server':<20} {'conc':>4} {'reqs':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
             f"{'ITL p50':>8} {'TPOT p50':>9} {'out tok/s':>10} {'encore/x':>9}"
             "  (ms; x = this row)"]
    for rec in records:
        if "error" in rec:
            lines.append(f"{rec['server']:<20} failed: {rec['error']}")
        for r in rec["rows"]:
            s, c = r["summary"], r["concurrency"]
            tps = s["output_token_throughput"]
            ratio = f"{enc[c] / tps:.2f}x" if c in enc and tps and rec["server"] != "encore" \
                else ""
            flag = "" if r["full_length"] else "  (not all requests full length!)"
            ms = {k: 1e3 * s[k].get(p, 0.0) for k, p in
                  (("ttft_s", "p50"), ("itl_s", "p50"), ("tpot_s", "p50"))}
            lines.append(
                f"{rec['server']:<20} {c:>4} {r['num_prompts']:>4} {ms['ttft_s']:>9.1f} "
                f"{1e3 * s['ttft_s'].get('p99', 0.0):>9.1f} {ms['itl_s']:>8.2f} "
                f"{ms['tpot_s']:>9.2f} {tps:>10.1f} {ratio:>9}{flag}")
    return "\n".join(lines)


def card(device: str) -> str:
    if device != "cuda" or not shutil.which("nvidia-smi"):
        return device
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else device


PEER_CHECK = """
import accelerate, torch, transformers, typer
from transformers.utils.import_utils import is_serve_available
assert is_serve_available(), "transformers serve needs fastapi, uvicorn, pydantic and openai"
print(torch.__version__, transformers.__version__)
"""


def peer_check(python: str) -> tuple[str, str]:
    """(torch and transformers versions, "") if ``python`` can run ``transformers serve`` on a
    device map (accelerate), else ("", the reason), in seconds instead of at its start."""
    out = subprocess.run([python, "-c", PEER_CHECK], capture_output=True, text=True,
                         env={**os.environ, **OFFLINE_ENV})
    if out.returncode:
        return "", (out.stderr.strip().splitlines() or ["failed"])[-1]
    return out.stdout.strip(), ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory (written if incomplete)")
    p.add_argument("--out", required=True, help="directory for serve_peer.json and the logs")
    p.add_argument("--shape", default="llama-3-8b", help="a preset of worker/models/presets.py")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--std", type=float, default=0.02, help="std of the random matrices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--servers", default="encore,transformers,transformers+graphs",
                   help=f"in order; choose from encore, {', '.join(PEER_MODES)}")
    p.add_argument("--concurrency", default="1,8,64",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--waves", type=int, default=2, help="prompts = max(min, waves * c)")
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (words)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="/v1/chat/completions")
    p.add_argument("--peer-python", default=sys.executable,
                   help="the python whose transformers serves")
    p.add_argument("--peer-args", default="", help="extra flags for transformers serve")
    p.add_argument("--encore-args", default="", help="extra flags for encore serve")
    p.add_argument("--start-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    args.ckpt = str(Path(args.ckpt).resolve())
    args.servers = args.servers.split(",")
    unknown = set(args.servers) - {"encore", *PEER_MODES}
    if unknown:
        p.error(f"unknown --servers {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(args)
    vocab = preset(args.shape).vocab_size
    versions, missing = peer_check(args.peer_python)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "card": card(args.device),
              "peer_torch_transformers": versions, "args": vars(args), "records": []}
    for name in args.servers:
        port = free_port()
        if name != "encore" and missing:
            print(f"{name}: not started: {missing}", file=sys.stderr)
            record = {"server": name, "error": missing, "rows": []}
        else:
            server = (encore_server(args, port) if name == "encore"
                      else peer_server(args, port, name))
            record = bench_server(server, args, port, vocab)
        report["records"].append(record)
        (out / "serve_peer.json").write_text(json.dumps(report, indent=1))
    print(f"\n{report['card']}, {args.shape}, {args.input_len} in -> {args.output_len} out, "
          f"{'chat' if args.chat else 'completions'}, peer torch/transformers "
          f"{report['peer_torch_transformers']}, {report['date']}, "
          f"{time.monotonic() - t0:.0f}s in all")
    print(table(report["records"]))
    ok = all("error" not in r and all(x["full_length"] for x in r["rows"])
             for r in report["records"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
