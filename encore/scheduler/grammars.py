"""Grammars in the engine (P1): compiled on a thread pool, cached, matched per sequence.

As in vLLM V1: a request whose grammar is still compiling waits outside the queue
(``WAITING_FOR_GRAMMAR``) and the step loop goes on; compiled grammars are kept by their
``GrammarSpec`` (kind and canonical text), so the same schema compiles once. The scheduler
holds one ``Matcher`` per sequence, sends the step's bitmasks in ``SchedulerOutput.grammar``
and advances each matcher with its sampled token.

    add_request ─► compile(spec) ─► Future ─(pool thread)─► CompiledGrammar, wake()
    schedule:      ready(seq)? → waiting queue;  bitmask(sampled constrained seqs)
    update:        matcher.accept(token); matcher.stopped → finish "stop"
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from encore.grammar import CompiledGrammar, GrammarError, Matcher, Vocab, compile_grammar
from encore.grammar import fill_bitmask as _fill
from encore.protocol.messages import GrammarBitmask, GrammarSpec, GrammarVocab

CACHE_SIZE = 512  # compiled grammars kept (least recently used dropped first)


class Grammars:
    """The compile pool, the cache of compiled grammars and the vocabulary they need.

    ``wake`` (set by the engine loop) is called from a pool thread whenever a compile ends,
    so a loop that sleeps on its inbox notices at once.
    """

    def __init__(self, vocab_size: int, max_workers: int = 2,
                 cache_size: int = CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._vocab: Future[Vocab] | None = None
        self._cache: OrderedDict[GrammarSpec, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.wake: Callable[[], None] | None = None
        self.compiles = 0  # grammars compiled (cache misses)

    def set_vocab(self, msg: GrammarVocab) -> None:
        """The tokenizer to compile against (P0 sends it once the engine is up); compiled
        grammars of an earlier vocabulary are dropped."""
        self._vocab = self._pool.submit(Vocab, msg.tokenizer_json, self.vocab_size,
                                        msg.eos_token_ids)
        with self._lock:
            self._cache.clear()

    def compile(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        """The compiled grammar of ``spec``: from the cache, or compiling on the pool."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(spec)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[spec] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        fut.add_done_callback(self._compiled)
        return fut

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        if self._vocab is None:
            raise GrammarError("structured outputs are not available: the server has not "
                               "given the engine its tokenizer", unsupported=True)
        self.compiles += 1
        return compile_grammar(self._vocab.result(), spec)

    def _compiled(self, _: Future) -> None:
        if self.wake is not None:
            self.wake()

    def bitmask(self, rows: list[tuple[str, Matcher]]) -> GrammarBitmask | None:
        """This step's masks for the constrained sequences about to sample (None: none)."""
        if not rows or self._vocab is None:
            return None
        words = self._vocab.result().words  # done: every matcher was compiled against it
        return GrammarBitmask(seq_ids=[seq_id for seq_id, _ in rows], words=words,
                              data=_fill([m for _, m in rows], words))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
