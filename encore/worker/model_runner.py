"""The model runner (P2's core): weights, the KV pool, one step at a time.

``execute(SchedulerOutput)`` packs the scheduled tokens of every sequence into one flat
batch, runs the model through the attention backend, samples the sequences whose last known
token was computed, and returns their token ids. Per-sequence sampling state (penalties,
seeded generators) lives here until the scheduler lists the sequence as finished.

``launch`` is the same without waiting: the sampled ids stay on the device (``Launched``
answers once their copy to the host lands). The next step's ``PLACEHOLDER`` tokens (asynchronous
scheduling: tokens the engine has not seen yet) are filled in on the device from the previous
launch's picks; under tensor parallelism rank 0 broadcasts its picks for that.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from encore.configs import EncoreConfig
from encore.protocol.messages import (
    PLACEHOLDER,
    GrammarBitmask,
    ModelRunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
    TokenLogprobs,
    WorkerReady,
)
from encore.worker.attention import AttentionMetadata, get_backend
from encore.worker.attention.base import LayerWaits
from encore.worker.cuda_graphs import DecodeGraphs
from encore.worker.devices import resolve_device, resolve_dtype
from encore.worker.memory_profile import kv_budget_after_profiling
from encore.worker.parallel import SINGLE, TPGroup
from encore.worker.sampler import Drawn, Sampler, SeqSamplingState, make_state, token_logprobs

logger = logging.getLogger(__name__)


@dataclass
class StepRows:
    """Which rows of a step's hidden states belong to which sequence."""

    sample_rows: list[int]  # flat index of the last token of each sampled sequence
    sample_seqs: list[ScheduledSeq]
    row_starts: list[int]  # flat index of each sequence's first token
    # A decode graph's static fp32 logits [n, V] and their argmax [n], when it computed them.
    logits: torch.Tensor | None = field(default=None, kw_only=True)
    argmax: torch.Tensor | None = field(default=None, kw_only=True)


@dataclass
class StepBatch(StepRows):
    """Host-side layout of one eager step, before it becomes tensors."""

    input_ids: torch.Tensor  # [T] int64, on the CPU
    positions: torch.Tensor  # [T] int64, on the CPU
    slots: torch.Tensor  # [T] int64, on the CPU (meta.slot_mapping is its device copy)
    meta: AttentionMetadata


@dataclass
class Launched:
    """A step whose kernels are queued: its answer but the sampled ids (``drawn``)."""

    out: ModelRunnerOutput
    drawn: Drawn | None = None

    def output(self) -> ModelRunnerOutput:
        """The answer, once the picks are on the host (waits for this step only)."""
        if self.drawn is not None:
            self.out.sampled_token_ids, self.out.logprobs = self.drawn.result()
            self.drawn = None
        return self.out


@dataclass
class Picks:
    """The last launched step's sampled ids on the device, by sequence: what the next step's
    placeholders read."""

    ids: torch.Tensor  # [N] int64
    rows: dict[str, int]


# ``cache.kv_cache_dtype`` other than auto (the model's dtype)
KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class ModelRunner:
    """Owns the model and the KV tensors of one device: under tensor parallelism (``tp``),
    this rank's shard of both. Every rank runs every step alike (the collectives pair up);
    only rank 0 samples."""

    def __init__(self, config: EncoreConfig, tp: TPGroup = SINGLE) -> None:
        from encore.worker.loader import load_model
        from encore.worker.models.llama import kv_bytes_per_block, kv_cache_shape

        self.config, self.tp = config, tp
        self.device = resolve_device(config.worker.device)
        if self.device.type == "cuda" and tp.size > 1:
            self.device = torch.device("cuda", tp.rank)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        if self.device.type == "cpu" and (config.worker.num_threads or tp.size > 1):
            torch.set_num_threads(config.worker.num_threads
                                  or max(1, (os.cpu_count() or 1) // tp.size))
        backend = config.worker.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.attn = get_backend(backend)
        self.model, self.arch = load_model(config.model, self.device, self.dtype, self.attn,
                                           tp=tp)
        self._quantize(config.worker.quantization)
        self.block_size = config.cache.block_size
        self.max_model_len = min(config.model.max_model_len or self.arch.max_position_embeddings,
                                 self.arch.max_position_embeddings)
        self.kv_dtype = KV_DTYPES.get(config.cache.kv_cache_dtype, self.dtype)
        self.num_blocks = tp.min_int(self._num_blocks(
            kv_bytes_per_block(self.arch, self.block_size, self.kv_dtype, tp),
            kv_bytes_per_block(self.arch, self.block_size, self.kv_dtype)))
        shape = kv_cache_shape(self.arch, self.num_blocks, self.block_size, tp)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(self.arch.num_layers)]
        self.sampler = Sampler(config.model.seed, self.device)
        self.states: dict[str, SeqSamplingState] = {}
        self.picks: Picks | None = None  # the last launch's, for the next one's placeholders
        self.graphs = self._capture_graphs(backend)
        self.blend_runtime = None  # blending's CUDA state, built on the first blend
        logger.info("worker ready: %s on %s (%s, KV %s), %d KV blocks of %d tokens, cuda graphs "
                    "%s%s", self.arch.architecture, self.device, self.dtype, self.kv_dtype,
                    self.num_blocks,
                    self.block_size, self.graphs.sizes if self.graphs else "off",
                    f", rank {tp.rank} of {tp.size}" if tp.size > 1 else "")

    def _quantize(self, mode: str) -> None:
        """Weight-only quantization (``models/quant.py``): the CPU's plain-torch path only."""
        if mode == "none":
            return
        if self.device.type != "cpu" or self.tp.size > 1:
            raise ValueError(f"quantization={mode} is supported on the CPU with one rank only "
                             f"(device {self.device}, tensor_parallel_size {self.tp.size})")
        from encore.worker.models.quant import quantize_model

        sizes = quantize_model(self.model, mode)
        logger.info("quantized %s: matrices %.0f MB -> %.0f MB", mode,
                    sizes["dense_bytes"] / 1e6, sizes["packed_bytes"] / 1e6)

    def _num_blocks(self, rank_bytes: int, full_bytes: int) -> int:
        """This rank's pool size: from its free memory on CUDA (``rank_bytes`` per block,
        this rank's shard); on the CPU ``kv_cache_gib`` holds whole blocks (``full_bytes``,
        all ranks together), whatever the number of ranks."""
        cache = self.config.cache
        if cache.num_device_blocks is not None:
            return cache.num_device_blocks
        if self.device.type == "cuda":
            budget = kv_budget_after_profiling(self, self.config.cache.gpu_memory_utilization)
            return max(2, int(budget // rank_bytes))
        return max(2, int(cache.kv_cache_gib * 1024**3 // full_bytes))

    def _capture_graphs(self, backend: str) -> DecodeGraphs | None:
        """Decode CUDA graphs on CUDA with the triton backend, unless ``enforce_eager``."""
        eager = self.config.worker.enforce_eager
        if self.device.type != "cuda" or backend != "triton" or eager:
            return None
        graphs = DecodeGraphs(self.model, self.kv_caches, self.config.scheduler.max_num_seqs,
                              self.max_model_len, self.block_size)
        graphs.capture()
        return graphs

    def ready_message(self) -> WorkerReady:
        return WorkerReady(num_device_blocks=self.num_blocks, max_model_len=self.max_model_len,
                           vocab_size=self.arch.vocab_size, device=str(self.device),
                           dtype=str(self.dtype).removeprefix("torch."))

    # ------------------------------------------------------------------ one step

    def execute(self, step: SchedulerOutput, ready: LayerWaits | None = None,
                masks: Callable[[], GrammarBitmask | None] | None = None) -> ModelRunnerOutput:
        """Run ``step``'s sequences, sample, and wait for the picks (``launch``)."""
        return self.launch(step, ready, masks).output()

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput, ready: LayerWaits | None = None,
               masks: Callable[[], GrammarBitmask | None] | None = None,
               settle: Callable[[], None] | None = None) -> Launched:
        """Run ``step``'s sequences and sample, leaving the picks on the device. ``ready``:
        the step's tier copies, which the forward pass waits for layer group by layer group
        (None: nothing to wait for). ``settle``: called once the forward pass is queued and
        before sampling (the previous step's answer, which updates the sampler's state)."""
        for seq_id in step.finished:
            self.states.pop(seq_id, None)
        picks, self.picks = self.picks, None
        out = ModelRunnerOutput(step_id=step.step_id)
        if not step.seqs:  # loads for a sequence that runs next step: order them first
            _wait_all(ready)
            return Launched(out)
        for seq in step.seqs:
            if not seq.store_only:
                self._register(seq)
        # The ordinary batch first (it computes the chunks that blends this step read).
        main = [s for s in step.seqs if s.blend is None]
        logits = argmax = None
        sampled: list[ScheduledSeq] = []
        if main:
            hidden, batch = self._forward(main, ready, picks)
            out.prompt_logprobs = self._prompt_logprobs(main, batch.row_starts, hidden)
            if batch.sample_rows:
                logits, argmax = self._sample_logits(hidden, batch)
                sampled = batch.sample_seqs
        blends = [s for s in step.seqs if s.blend is not None]
        if blends:
            _wait_all(ready)
            logits, argmax = self._blend(blends, logits, argmax, out.chunk_deviation)
            sampled = [*sampled, *blends]
        if settle is not None:
            settle()
        if logits is None:
            return Launched(out)
        rows = {s.seq_id: i for i, s in enumerate(sampled)}
        if self.tp.rank != 0:  # the other ranks computed the same logits; rank 0 samples
            if step.defer_output:  # rank 0's picks, for the next step's placeholders
                ids = torch.empty(len(sampled), dtype=torch.int64, device=self.device)
                self.picks = Picks(self.tp.broadcast(ids), rows)
            return Launched(out)
        states = [self.states[s.seq_id] for s in sampled]
        grammar = step.grammar if masks is None else masks()  # built during the forward pass
        drawn = self.sampler.draw(logits, states, argmax, grammar, list(rows))
        if step.defer_output:
            self.picks = Picks(self.tp.broadcast(drawn.chosen), rows)
        out.seq_ids = list(rows)
        return Launched(out, drawn)

    def _blend(self, seqs: list[ScheduledSeq], logits: torch.Tensor | None,
               argmax: torch.Tensor | None, deviations: dict[str, list[float]]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blend each sequence's prompt from its cached chunks (``worker/blend.py``); their
        logits rows follow the ordinary batch's."""
        from encore.worker.blend import blend_forward

        if self.blend_runtime is None:
            self.blend_runtime = self._blend_runtime()
        rows = []
        for seq in seqs:
            hidden, deviations[seq.seq_id] = blend_forward(self.model, self.kv_caches, seq,
                                                           self.block_size, self.blend_runtime)
            rows.append(self.model.compute_logits(hidden))
        blended = torch.cat(rows)
        if logits is None:
            return blended, None
        if argmax is not None:
            argmax = torch.cat((argmax, blended.argmax(-1)))
        return torch.cat((logits, blended)), argmax

    def _blend_runtime(self) -> Any:
        """Cache addresses for the fused re-rotation, and kept-row CUDA graphs when decode
        graphs are on (CUDA, triton, not enforce_eager)."""
        from encore.worker.blend import BlendRuntime

        if self.model.ops is None:
            return BlendRuntime()
        from encore.kernels.rope import layer_pointers
        from encore.worker.blend_graphs import KeptRowGraphs

        graphs = None
        if self.graphs is not None:
            max_blocks = -(-self.max_model_len // self.block_size)
            graphs = KeptRowGraphs(self.model, self.kv_caches, max_blocks)
        return BlendRuntime(layer_pointers(self.kv_caches), graphs)

    def _sample_logits(self, hidden: torch.Tensor, batch: StepRows
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 logits of the sampled rows, with their argmax when a decode graph made both."""
        logits, argmax = batch.logits, batch.argmax
        if len(batch.sample_rows) < hidden.shape[0]:
            rows = to_device(torch.tensor(batch.sample_rows, dtype=torch.long), self.device)
            if logits is None or argmax is None:
                return self.model.compute_logits(hidden.index_select(0, rows)), None
            return logits.index_select(0, rows), argmax.index_select(0, rows)
        if logits is None:
            return self.model.compute_logits(hidden), None
        return logits, argmax

    def _prompt_logprobs(self, seqs: list[ScheduledSeq], row_starts: list[int],
                         hidden: torch.Tensor) -> dict[str, list[TokenLogprobs | None]] | None:
        """Logprobs of the prompt tokens this chunk covers (position 0 has none).

            chunk rows:  p=start ... start+n-1   each row's logits score the token at p+1
            entries:     [None if start == 0] + tokens at (start, start+n] ∩ [1, prompt_len)
        """
        out: dict[str, list[TokenLogprobs | None]] = {}
        for seq, row0 in zip(seqs, row_starts, strict=True):
            if seq.store_only:
                continue
            st = self.states[seq.seq_id]
            k, prompt = st.params.prompt_logprobs, st.prompt_token_ids
            if k is None or seq.start_pos >= len(prompt):
                continue
            end = min(seq.start_pos + len(seq.token_ids), len(prompt) - 1)
            targets = prompt[seq.start_pos + 1:end + 1]
            entries: list[TokenLogprobs | None] = [None] if seq.start_pos == 0 else []
            if targets:
                logits = self.model.compute_logits(hidden[row0:row0 + len(targets)])
                entries.extend(token_logprobs(torch.log_softmax(logits, dim=-1), targets, k))
            out[seq.seq_id] = entries
        return out or None

    def _register(self, seq: ScheduledSeq) -> None:
        if seq.seq_id in self.states:
            return
        if seq.sampling is None or seq.prompt_token_ids is None:
            raise ValueError(f"sequence {seq.seq_id!r} first scheduled without sampling params")
        self.states[seq.seq_id] = make_state(seq.sampling, seq.prompt_token_ids,
                                             seq.output_token_ids, seq.eos_token_ids or [],
                                             seq.seed_index, self.device)

    def _forward(self, seqs: list[ScheduledSeq], ready: LayerWaits | None = None,
                 picks: Picks | None = None) -> tuple[torch.Tensor, StepRows]:
        """Hidden states of every scheduled token: a graph replay for a decode-only batch
        that fits a captured size, else one eager forward of the flat batch. ``ready``: the
        step's host copies; an eager Llama waits layer group by layer group, any other path
        for all of them first. ``picks``: the previous step's, for the placeholders."""
        graphs = self.graphs
        fill = self._placeholders(seqs, picks)
        if graphs is not None and all(len(s.token_ids) == 1 for s in seqs) \
                and graphs.padded(len(seqs)) is not None:
            _wait_all(ready)
            return self._graph_forward(graphs, seqs, fill)
        batch = self._prepare(seqs)
        if getattr(self.model, "waits_per_layer", False):
            batch.meta.layer_ready = ready
        else:
            _wait_all(ready)
        input_ids = to_device(batch.input_ids, self.device)
        if fill is not None:
            fill(input_ids)
        hidden = self.model(input_ids, to_device(batch.positions, self.device), self.kv_caches,
                            batch.meta)
        return hidden, batch

    def _placeholders(self, seqs: list[ScheduledSeq], picks: Picks | None
                      ) -> Callable[[torch.Tensor], None] | None:
        """Writes the previous step's picks into the flat input ids at this step's
        placeholders (on the device: the picks are never waited for); None without any."""
        flat, rows, offset = [], [], 0
        for s in seqs:
            offset += len(s.token_ids)
            if s.token_ids[-1] != PLACEHOLDER:  # a placeholder is a sequence's last token
                continue
            if picks is None or s.seq_id not in picks.rows:
                raise ValueError(f"{s.seq_id}: a placeholder token, but the previous step "
                                 "sampled no token for it")
            flat.append(offset - 1)
            rows.append(picks.rows[s.seq_id])
        if not flat:
            return None
        assert picks is not None
        src, n = picks.ids, len(flat)

        def fill(ids: torch.Tensor) -> None:
            if flat == rows == list(range(n)):  # a decode batch in the last step's order
                ids[:n].copy_(src[:n])
                return
            dev = ids.device
            ids[to_device(torch.tensor(flat), dev)] = src[to_device(torch.tensor(rows), dev)]

        return fill

    def _graph_forward(self, graphs: DecodeGraphs, seqs: list[ScheduledSeq],
                       fill: Callable[[torch.Tensor], None] | None = None
                       ) -> tuple[torch.Tensor, StepRows]:
        bs = self.block_size
        positions = [s.start_pos for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions,
                                                                     strict=True)]
        hidden = graphs.run([s.token_ids[0] for s in seqs], positions, slots,
                            [s.block_table for s in seqs], fill)
        sampled = [i for i, s in enumerate(seqs) if s.sample]
        n = len(seqs)
        return hidden, StepRows(sampled, [seqs[i] for i in sampled], list(range(n)),
                                logits=graphs.logits[:n], argmax=graphs.argmax[:n])

    def _prepare(self, seqs: list[ScheduledSeq]) -> StepBatch:
        """The flat batch, built with numpy (per-token Python cost ~8 ms at 8k tokens)."""
        bs = self.block_size
        qlens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, len(seqs))
        starts = np.fromiter((s.start_pos for s in seqs), np.int64, len(seqs))
        ends = np.cumsum(qlens)
        firsts = ends - qlens
        width = max(len(s.block_table) for s in seqs)
        tables = np.zeros((len(seqs), width), np.int64)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
        seq_of = np.repeat(np.arange(len(seqs)), qlens)
        positions = np.arange(int(ends[-1])) - firsts[seq_of] + starts[seq_of]
        slots = tables[seq_of, positions // bs] * bs + positions % bs
        input_ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs),
                                np.int64, int(ends[-1]))
        sampled = [i for i, s in enumerate(seqs) if s.sample]
        meta = self._metadata(qlens, starts, tables, slots)
        return StepBatch((ends[sampled] - 1).tolist(), [seqs[i] for i in sampled],
                         firsts.tolist(), torch.from_numpy(input_ids),
                         torch.from_numpy(positions), torch.from_numpy(slots), meta)

    def _metadata(self, qlens: np.ndarray, starts: np.ndarray, tables: np.ndarray,
                  slots: np.ndarray) -> AttentionMetadata:
        dev = self.device
        seq_lens = qlens + starts
        qsl = np.concatenate(([0], np.cumsum(qlens)))
        return AttentionMetadata(
            query_lens=qlens.tolist(), start_pos=starts.tolist(),
            query_start_loc=to_device(torch.from_numpy(qsl.astype(np.int32)), dev),
            seq_lens=to_device(torch.from_numpy(seq_lens.astype(np.int32)), dev),
            block_tables=to_device(torch.from_numpy(tables.astype(np.int32)), dev),
            slot_mapping=to_device(torch.from_numpy(slots), dev),
            max_query_len=int(qlens.max()), max_seq_len=int(seq_lens.max()))


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without the host waiting for the device. A plain ``.to``
    from pageable memory synchronizes the stream, so under asynchronous scheduling the next
    step's inputs would wait for the step in flight, and its kernels would be queued only
    once the GPU had gone idle. On CUDA the tensor goes through pinned memory and an
    asynchronous copy (torch's host allocator keeps the pinned buffer until the copy is
    done); elsewhere it is ``.to``."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _wait_all(ready: LayerWaits | None) -> None:
    """Make the current stream wait for every host-tier load of the step."""
    if ready is not None:
        ready.wait_all()
