"""P2 entry point: ``python -m encore.worker.main --in ADDR --out ADDR`` (config on stdin).

Loads the model, sends ``WorkerReady`` (or ``EngineDead`` with the reason if loading fails),
then answers each ``SchedulerOutput`` with a ``ModelRunnerOutput`` until ``Shutdown`` (one with
``defer_output`` once the next step is launched, or on ``Drain``).
Under tensor parallelism the executor starts one per rank (``--rank R --tp-size N
--dist-init file://...``); each joins the torch.distributed group before loading its shard.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from encore.protocol.heap import freeze_startup_heap
from encore.protocol.lifeline import exit_with_parent, ignore_group_signals
from encore.protocol.messages import (
    Drain,
    EngineDead,
    GrammarBitmask,
    GrammarMasks,
    ModelRunnerOutput,
    SchedulerOutput,
    Shutdown,
    decode,
    encode,
)
from encore.protocol.spawn import read_config

logger = logging.getLogger("encore.worker")

if TYPE_CHECKING:  # the model (torch) loads only when the worker starts
    from encore.worker.worker import Worker


def serve(worker: Worker, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    while True:
        msg = decode(inbox.recv(copy=False).buffer)
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, GrammarMasks):
            continue  # of a step that failed before it sampled
        if isinstance(msg, Drain):
            _answer(worker.drain, outbox, None)
            continue
        if not isinstance(msg, SchedulerOutput):
            logger.error("worker got unexpected %s", type(msg).__name__)
            continue
        masks = functools.partial(_masks_of, inbox, msg.step_id) if msg.grammar_follows \
            else None
        _answer(functools.partial(worker.submit, msg, masks), outbox, msg.step_id)


def _answer(run: Callable[[Callable[[ModelRunnerOutput], None]], None], outbox: zmq.Socket,
            step_id: int | None) -> None:
    """``run(emit)``, sending what it emits; a failure must reach the engine, not hang it
    (as the answer of ``step_id``, or of the step being drained)."""
    def emit(out: ModelRunnerOutput) -> None:
        outbox.send(encode(out), copy=False)

    try:
        run(emit)
    except Exception as e:
        logger.exception("step %s failed", step_id if step_id is not None else "(drain)")
        outbox.send(encode(ModelRunnerOutput(step_id=-1 if step_id is None else step_id,
                                             error=f"{type(e).__name__}: {e}")), copy=False)


def _masks_of(inbox: zmq.Socket, step_id: int) -> GrammarBitmask | None:
    """The ``GrammarMasks`` the engine sends right after step ``step_id`` (rank 0)."""
    while True:
        msg = decode(inbox.recv(copy=False).buffer)
        if isinstance(msg, GrammarMasks) and msg.step_id == step_id:
            return msg.grammar
        if not isinstance(msg, GrammarMasks):
            raise RuntimeError(f"expected the grammar masks of step {step_id}, "
                               f"got {type(msg).__name__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="encore-worker")
    ap.add_argument("--in", dest="inbox", required=True)
    ap.add_argument("--out", dest="outbox", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--dist-init", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ignore_group_signals()
    exit_with_parent()
    config = read_config()
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(args.inbox)
    outbox.connect(args.outbox)
    try:
        from encore.worker.parallel import close_group, init_group
        from encore.worker.worker import Worker

        tp = init_group(args.rank, args.tp_size, args.dist_init, config.worker.device)
        worker = Worker(config, tp)
    except Exception as e:
        logger.error("worker failed to start: %s", e)
        outbox.send(encode(EngineDead(reason=f"{type(e).__name__}: {e}")))
        outbox.close(linger=2000)
        return 1
    freeze_startup_heap()  # the model, its modules and the runner's structures
    outbox.send(encode(worker.ready_message()))
    try:
        serve(worker, inbox, outbox)
    finally:
        worker.close()  # let disk writes in flight finish
        close_group(tp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
