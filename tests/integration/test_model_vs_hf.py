"""Our Llama-family model, driven through the paged KV path, against transformers (fp32).

Teacher-forced logits must agree to a relative error < 1e-4 (max |diff| / max |reference|),
in one prefill and in two chunks; greedy continuations of SmolLM2 must match token for token
on at least 9 of 10 chat prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from encore.configs.types import ModelConfig
from encore.worker.attention.torch_backend import TorchAttentionBackend
from encore.worker.loader import default_gguf_path, load_model
from tests.helpers.paged import alloc_kv_caches, disjoint_block_tables, make_batch
from tests.helpers.tiny_models import make_tiny_model_dir

transformers = pytest.importorskip("transformers")

BLOCK = 4
REL_TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def load_ours(model: str):
    return load_model(
        ModelConfig(model=model), torch.device("cpu"), torch.float32, TorchAttentionBackend()
    )


def paged_logits(model, arch, ids: list[int], split: int | None = None) -> torch.Tensor:
    """Logits of every position, via one prefill or two chunks [0, split) and [split, n)."""
    caches = alloc_kv_caches(arch, num_blocks=64, block_size=BLOCK)
    table = disjoint_block_tables([len(ids)], BLOCK, first=3)  # not starting at block 0
    cuts = [0, len(ids)] if split is None else [0, split, len(ids)]
    out = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        batch = make_batch([(ids[lo:hi], lo)], table, BLOCK)
        out.append(
            model.compute_logits(model(batch.input_ids, batch.positions, caches, batch.meta))
        )
    return torch.cat(out)


@pytest.fixture(scope="module")
def smollm():
    """(ours, arch, hf model, hf tokenizer) for the embedded SmolLM2 GGUF, all fp32."""
    path = default_gguf_path()
    ours, arch = load_ours(str(path))
    kwargs = dict(gguf_file=path.name, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, arch, hf, tok


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ours, arch = load_ours(str(path))
    return ours, arch, hf


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_tiny_models_logits_match_hf(tiny):
    ours, arch, hf = tiny
    torch.manual_seed(0)
    ids = torch.randint(3, arch.vocab_size, (24,)).tolist()
    ref = hf_logits(hf, ids)
    assert rel_err(paged_logits(ours, arch, ids), ref) < REL_TOL
    assert rel_err(paged_logits(ours, arch, ids, split=11), ref) < REL_TOL


def test_tiny_llama_uses_llama3_rope_scaling(tiny):
    ours, arch, _ = tiny
    if arch.architecture == "LlamaForCausalLM":
        assert arch.rope_scaling is not None and arch.rope_scaling["rope_type"] == "llama3"
    assert arch.attention_bias == (arch.architecture == "Qwen2ForCausalLM")
    assert arch.qk_norm == (arch.architecture == "Qwen3ForCausalLM")


def test_smollm2_gguf_logits_match_hf(smollm):
    ours, arch, hf, tok = smollm
    text = (
        "The capital of France is Paris, and the capital of Japan is Tokyo. Both cities are "
        "famous for their food, museums and long history."
    )
    ids = tok(text).input_ids[:24]
    assert len(ids) >= 20
    ref = hf_logits(hf, ids)
    assert rel_err(paged_logits(ours, arch, ids), ref) < REL_TOL
    assert rel_err(paged_logits(ours, arch, ids, split=13), ref) < REL_TOL


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash function is in one sentence.",
    "List three fruits.",
    "How do I reverse a list in Python?",
    "What is 12 times 7?",
    "Give me a synonym for 'happy'.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Tell me a fun fact about octopuses.",
]


def greedy_paged(model, arch, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy decoding of all prompts as one ragged batch through the paged KV cache:
    prefill every prompt in one step, then one token per unfinished sequence per step."""
    lengths = [len(p) + max_new for p in prompts]
    caches = alloc_kv_caches(
        arch, num_blocks=sum(n // BLOCK + 1 for n in lengths), block_size=BLOCK
    )
    tables = disjoint_block_tables(lengths, BLOCK)
    outs: list[list[int]] = [[] for _ in prompts]
    pending = {i: (p, 0) for i, p in enumerate(prompts)}  # seq -> (new tokens, start_pos)
    while pending:
        seqs = sorted(pending)
        batch = make_batch([pending[i] for i in seqs], [tables[i] for i in seqs], BLOCK)
        hidden = model(batch.input_ids, batch.positions, caches, batch.meta)
        tokens = model.compute_logits(hidden[batch.last_token_rows]).argmax(-1).tolist()
        for i, token in zip(seqs, tokens, strict=True):
            outs[i].append(token)
            new, start = pending.pop(i)
            if token not in arch.eos_token_ids and len(outs[i]) < max_new:
                pending[i] = ([token], start + len(new))
    return outs


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm):
    ours, arch, hf, tok = smollm
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        ).input_ids
        for text in PROMPTS
    ]
    got = greedy_paged(ours, arch, prompts, 32)
    matches = 0
    for ids, mine in zip(prompts, got, strict=True):
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=arch.eos_token_ids,
                pad_token_id=arch.eos_token_ids[0],
            )
        matches += mine == gen[0, len(ids) :].tolist()
    assert matches >= 9


def test_kv_cache_sizing_helpers(tiny):
    from encore.worker.models.llama import kv_bytes_per_block, kv_cache_shape

    _, arch, _ = tiny
    shape = kv_cache_shape(arch, num_blocks=10, block_size=16)
    assert shape == (2, 10, 16, arch.num_kv_heads, arch.head_dim)
    per_layer = 2 * 16 * arch.num_kv_heads * arch.head_dim * 2
    assert kv_bytes_per_block(arch, 16, torch.bfloat16) == per_layer * arch.num_layers


def test_dummy_preset_is_seeded_and_finite():
    cfg = ModelConfig(model="tiny", load_format="dummy", seed=3)
    a, arch = load_model(cfg, torch.device("cpu"), torch.float32, TorchAttentionBackend())
    b, _ = load_model(cfg, torch.device("cpu"), torch.float32, TorchAttentionBackend())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    ids = list(range(5, 25))
    logits = paged_logits(a, arch, ids)
    assert logits.shape == (20, arch.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(paged_logits(a, arch, ids, split=7).argmax(-1), logits.argmax(-1))


def test_bf16_model_tracks_fp32(tmp_path: Path):
    path = make_tiny_model_dir(tmp_path / "m", "llama")
    ref, arch = load_ours(str(path))
    half, _ = load_model(
        ModelConfig(model=str(path)), torch.device("cpu"), torch.bfloat16, TorchAttentionBackend()
    )
    ids = list(range(3, 27))
    caches = alloc_kv_caches(arch, 16, BLOCK, dtype=torch.bfloat16)
    batch = make_batch([(ids, 0)], disjoint_block_tables([24], BLOCK), BLOCK)
    got = half.compute_logits(half(batch.input_ids, batch.positions, caches, batch.meta))
    assert got.dtype == torch.float32
    assert rel_err(got, paged_logits(ref, arch, ids)) < 5e-2
    # one decode step (a single row takes the torch.mv path in bf16)
    step = make_batch([([7], 24)], disjoint_block_tables([25], BLOCK), BLOCK)
    one = half.compute_logits(half(step.input_ids, step.positions, caches, step.meta))
    assert rel_err(one[0], paged_logits(ref, arch, ids + [7])[-1]) < 5e-2


@pytest.mark.parametrize(
    "qtype,tied",
    [
        ("F32", False),
        ("F16", True),
        ("BF16", False),
        ("Q8_0", True),
        ("Q4_0", False),
        ("Q4_1", False),
    ],
)
def test_tiny_gguf_logits_match_hf(tmp_path: Path, qtype: str, tied: bool):
    """A GGUF written like llama.cpp's converter (permuted q/k, quantized): our loader and
    transformers' GGUF loader must build the same model."""
    from tests.helpers.tiny_models import make_tiny_gguf

    path, _ = make_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", qtype=qtype, tie_word_embeddings=tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours, arch = load_ours(str(path))
    assert arch.tie_word_embeddings == tied
    ids = torch.randint(3, arch.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf, ids.tolist())
    assert rel_err(paged_logits(ours, arch, ids.tolist(), split=9), ref) < REL_TOL


def test_tiny_gguf_with_llama3_rope_freqs_matches_hf_dir(tmp_path: Path):
    """llama.cpp stores Llama 3.1 RoPE scaling as rope_freqs; we recover HF's llama3 params."""
    from tests.helpers.tiny_models import make_tiny_gguf

    path, hf_dir = make_tiny_gguf(tmp_path / "tiny-l31.gguf", llama3_rope=True)
    ours, arch = load_ours(str(path))
    assert arch.rope_scaling is not None and arch.rope_scaling["factor"] == 8.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = (list(range(3, 200)) * 2)[:240]  # long enough for the scaled bands to matter
    ref = hf_logits(hf, ids)
    assert rel_err(paged_logits(ours, arch, ids, split=100), ref) < REL_TOL
