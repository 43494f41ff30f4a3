"""Token sampling for one step: penalties, min-tokens masking, logprobs, then pick.

Every row is independent of its batch neighbours: a seeded request draws its randomness from
its own ``torch.Generator`` (seeded from ``(seed, child index)``), so the same seed gives the
same tokens whatever else runs in the batch. Sampling uses the exponential race
(``argmax(p / q)``, ``q ~ Exp(1)``), which draws exactly from ``p``.

Order, as in vLLM: penalties → min-tokens mask → grammar mask (structured outputs: the step's
token bitmask, applied to the whole batch at once) → logprobs (of the penalized, masked logits,
before temperature) → temperature → top-k → top-p → min-p → sample.

Sampling stays finite whatever the parameters: a temperature below GREEDY_TEMPERATURE is
greedy, and penalized logits are clamped to ±LOGIT_LIMIT (a repetition penalty of 5e-324
would otherwise divide logits to infinity, and softmax of infinities is NaN).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from encore.protocol.messages import GrammarBitmask, Logprob, SamplingParams, TokenLogprobs

# Dividing logits by a smaller temperature overflows float32 (the API sends these as 0).
GREEDY_TEMPERATURE = 1e-5
# No model's logits come near this; divided by GREEDY_TEMPERATURE it is still far below
# float32's max (3.4e38), so temperature never turns a clamped logit into infinity.
LOGIT_LIMIT = 1e4


def is_greedy(params: SamplingParams) -> bool:
    """Argmax: temperature 0 (or too small to divide by) or top_k 1."""
    return params.greedy or params.temperature < GREEDY_TEMPERATURE


def child_seed(seed: int, index: int) -> int:
    """A 63-bit seed for child ``index`` of a request seeded with ``seed`` (stable anywhere)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class SeqSamplingState:
    """What the sampler remembers about one sequence between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)  # masked until min_tokens is reached
    generator: torch.Generator | None = None


def make_state(params: SamplingParams, prompt: list[int], output: list[int] | None,
               eos_ids: list[int], seed_index: int, device: torch.device) -> SeqSamplingState:
    gen = None
    if params.seed is not None and not is_greedy(params):
        gen = torch.Generator(device=device)
        gen.manual_seed(child_seed(params.seed, seed_index))
    stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_ids))
    return SeqSamplingState(params, list(prompt), list(output or []), stop_ids, gen)


def _apply_penalties(logits: torch.Tensor, states: list[SeqSamplingState]) -> bool:
    """In place, row by row, only for rows that ask for a penalty; True if any did. A
    penalized row is made finite and clamped to ±LOGIT_LIMIT, whatever the penalty."""
    changed = False
    for i, st in enumerate(states):
        p = st.params
        row_changed = False
        if p.repetition_penalty != 1.0:
            row_changed = True
            seen = torch.tensor(sorted(set(st.prompt_token_ids) | set(st.output_token_ids)),
                                dtype=torch.long, device=logits.device)
            if seen.numel():
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                              vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and st.output_token_ids:
            row_changed = True
            out = torch.tensor(st.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if row_changed:  # an extreme penalty makes ±inf, and 0 x inf = NaN: never preferred
            logits[i].nan_to_num_(nan=-LOGIT_LIMIT, posinf=LOGIT_LIMIT, neginf=-LOGIT_LIMIT)
            logits[i].clamp_(-LOGIT_LIMIT, LOGIT_LIMIT)
        changed = changed or row_changed
    return changed


def _mask_min_tokens(logits: torch.Tensor, states: list[SeqSamplingState]) -> bool:
    """Mask stop ids of rows below min_tokens; True if any row was masked."""
    changed = False
    for i, st in enumerate(states):
        if st.stop_ids and len(st.output_token_ids) < st.params.min_tokens:
            logits[i, st.stop_ids] = float("-inf")
            changed = True
    return changed


def unpack_bitmask(bitmask: torch.Tensor, on_host: bool) -> torch.Tensor:
    """[N, W] int32 words -> [N, 32 * W] bool (bit t of the row = token t allowed)."""
    if on_host:
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1).bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits[i, t] = -inf`` where bit ``t % 32`` of ``bitmask[i, t // 32]`` is
    clear. ``logits`` [N, V] float, ``bitmask`` [N, W] int32 (little-endian words) on the
    same device; tokens past ``32 * W`` are masked too. On the CPU the bits are unpacked by
    numpy and applied in one pass (a pass over the logits is the cost); on a GPU by shifts."""
    v = logits.shape[1]
    allowed = unpack_bitmask(bitmask, on_host=logits.device.type == "cpu")
    width = min(v, allowed.shape[1])
    if width < v:
        logits[:, width:] = float("-inf")
    part = logits[:, :width]
    torch.where(allowed[:, :width], part, torch.tensor(float("-inf"), device=logits.device),
                out=part)


def _mask_grammar(logits: torch.Tensor, grammar: GrammarBitmask | None,
                  seq_ids: list[str] | None) -> bool:
    """Mask the rows of constrained sequences (``seq_ids[i]`` is row i) with their grammar's
    bitmask, in one batched op; True if any row was masked."""
    if grammar is None or not grammar.seq_ids or seq_ids is None:
        return False
    row_of = {seq_id: i for i, seq_id in enumerate(seq_ids)}
    pairs = [(row_of[s], j) for j, s in enumerate(grammar.seq_ids) if s in row_of]
    if not pairs:
        return False
    masks = torch.frombuffer(bytearray(grammar.data), dtype=torch.int32).view(-1, grammar.words)
    if [j for _, j in pairs] != list(range(len(grammar.seq_ids))):
        masks = masks[[j for _, j in pairs]]
    masks = masks.to(logits.device, non_blocking=True)
    if [i for i, _ in pairs] == list(range(logits.shape[0])):  # every row: mask in place
        apply_token_bitmask(logits, masks)
        return True
    rows = torch.tensor([i for i, _ in pairs], device=logits.device)
    sub = logits.index_select(0, rows)
    apply_token_bitmask(sub, masks)
    logits.index_copy_(0, rows, sub)
    return True


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row [V]: temperature, top-k, top-p, min-p; returns probabilities."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = (cum - sorted_p) > p.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprobs]:
    """Per row of ``logprobs`` [N, V]: the logprob of ``token_ids[i]`` and the top ``k``."""
    rows = torch.arange(len(token_ids), device=logprobs.device)
    chosen = logprobs[rows, torch.tensor(token_ids, device=logprobs.device)].tolist()
    tops: list[list[Logprob]] = [[] for _ in token_ids]
    if k > 0:
        vals, ids = torch.topk(logprobs, k, dim=-1)
        tops = _top_lists(ids, vals)
    return [TokenLogprobs(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops, strict=True)]


def _top_lists(ids: torch.Tensor, vals: torch.Tensor) -> list[list[Logprob]]:
    """Rows of top-k ``ids`` and their ``vals`` ([N, k] each) as ``Logprob`` lists."""
    return [[Logprob(t, v) for t, v in zip(ti, vi, strict=True)]
            for ti, vi in zip(ids.tolist(), vals.tolist(), strict=True)]


@dataclass
class Drawn:
    """One step's picks, still on the device: ``chosen`` [N] (the next step's placeholders
    read it there) and its copy to the host in flight; ``result`` waits for that copy only."""

    chosen: torch.Tensor
    states: list[SeqSamplingState]
    host_ids: torch.Tensor  # [N] int64 on the host (pinned on CUDA), valid once ``ready``
    ready: torch.cuda.Event | None = None
    chosen_lp: torch.Tensor | None = None  # [N] logprob of each chosen token, on the host
    top_vals: torch.Tensor | None = None  # [N, k] on the host
    top_ids: torch.Tensor | None = None

    def result(self) -> tuple[list[int], list[TokenLogprobs] | None]:
        """The token ids and logprobs as lists; the rows' states learn their new token."""
        if self.ready is not None:
            self.ready.synchronize()
        ids = self.host_ids.tolist()
        lps = None
        if self.chosen_lp is not None:
            chosen = self.chosen_lp.tolist()
            tops: list[list[Logprob]] = [[] for _ in ids]
            if self.top_ids is not None and self.top_vals is not None:
                tops = _top_lists(self.top_ids, self.top_vals)
            lps = [TokenLogprobs(t, lp, top[:st.params.logprobs or 0])
                   for t, lp, top, st in zip(ids, chosen, tops, self.states, strict=True)]
        for st, tok in zip(self.states, ids, strict=True):
            st.output_token_ids.append(tok)
        return ids, lps


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the host: a pinned copy in flight on CUDA (``Drawn.ready`` says when)."""
    if x.device.type == "cpu":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


class Sampler:
    """Picks one token per row. ``default_generator`` serves unseeded random rows."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, states: list[SeqSamplingState],
                 argmax: torch.Tensor | None = None, grammar: GrammarBitmask | None = None,
                 seq_ids: list[str] | None = None
                 ) -> tuple[list[int], list[TokenLogprobs] | None]:
        """``logits`` [N, V] float32 (mutated). Returns token ids and, if asked, logprobs
        (``draw`` then ``Drawn.result``)."""
        return self.draw(logits, states, argmax, grammar, seq_ids).result()

    def draw(self, logits: torch.Tensor, states: list[SeqSamplingState],
             argmax: torch.Tensor | None = None, grammar: GrammarBitmask | None = None,
             seq_ids: list[str] | None = None) -> Drawn:
        """Pick every row's token on the device, without waiting for it.

        ``argmax`` [N] int64: the argmax of ``logits`` as given, already computed (inside a
        decode CUDA graph); used (copied: the graph's buffer is reused) unless a penalty or a
        mask applies. ``grammar``: the step's token bitmasks (``SchedulerOutput.grammar``),
        whose rows are matched to the batch by ``seq_ids`` (row i samples ``seq_ids[i]``).
        """
        changed = _apply_penalties(logits, states)
        changed = _mask_min_tokens(logits, states) or changed
        changed = _mask_grammar(logits, grammar, seq_ids) or changed
        want_lp = any(st.params.logprobs is not None for st in states)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        chosen = argmax.clone() if argmax is not None and not changed \
            else torch.argmax(logits, dim=-1)
        for i, st in enumerate(states):
            if is_greedy(st.params):
                continue
            probs = _filter(logits[i], st.params)
            gen = st.generator or self.default_generator
            q = torch.empty_like(probs).exponential_(generator=gen)
            chosen[i] = torch.argmax(probs / q)
        drawn = Drawn(chosen, states, _to_host(chosen))
        if logprobs is not None:
            drawn.chosen_lp = _to_host(logprobs.gather(1, chosen[:, None]).squeeze(1))
            k = max(st.params.logprobs or 0 for st in states)
            if k > 0:
                vals, ids = torch.topk(logprobs, k, dim=-1)
                drawn.top_vals, drawn.top_ids = _to_host(vals), _to_host(ids)
        if chosen.device.type == "cuda":
            drawn.ready = torch.cuda.Event()
            drawn.ready.record()
        return drawn
