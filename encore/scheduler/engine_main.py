"""P1 entry point: ``python -m encore.scheduler.engine_main --in ADDR --out ADDR``, config on stdin.

Two I/O threads own the sockets (decode into the inbox queue; encode from the outbox queue);
the main thread runs the EngineLoop over an MPExecutor (the worker, P2, is our child).
The first message out is ``EngineReady`` or ``EngineDead``.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading

import msgspec
import zmq

from encore.configs import EncoreConfig
from encore.protocol.executor import MPExecutor, WorkerDiedError
from encore.protocol.heap import freeze_startup_heap
from encore.protocol.lifeline import exit_with_parent, ignore_group_signals
from encore.protocol.messages import EngineDead, Message, Shutdown, decode, encode
from encore.protocol.spawn import read_config
from encore.scheduler.engine import EngineCore, EngineLoop

logger = logging.getLogger("encore.engine")


def _reader(sock: zmq.Socket, inbox: queue.Queue) -> None:
    while True:
        try:
            msg = decode(sock.recv(copy=False).buffer)
        except zmq.ContextTerminated:
            return
        except msgspec.DecodeError as e:
            logger.error("dropped an undecodable message: %s", e)
            continue
        inbox.put(msg)
        if isinstance(msg, Shutdown):
            return


def _writer(sock: zmq.Socket, outbox: queue.Queue) -> None:
    while True:
        msg = outbox.get()
        if msg is None:
            return
        sock.send(encode(msg), copy=False)


def run_engine(config: EncoreConfig, in_addr: str, out_addr: str, model_name: str) -> int:
    ctx = zmq.Context()
    inp, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inp.connect(in_addr)
    out.connect(out_addr)
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue[Message | None] = queue.Queue()
    threading.Thread(target=_reader, args=(inp, inbox), daemon=True, name="engine-in").start()
    writer = threading.Thread(target=_writer, args=(out, outbox), daemon=True, name="engine-out")
    writer.start()
    core = EngineCore(config, MPExecutor(config), model_name)
    code = 0
    try:
        outbox.put(core.start())
        freeze_startup_heap()
        EngineLoop(core, inbox, outbox.put).run()
    except WorkerDiedError as e:
        logger.error("engine cannot continue: %s", e)
        outbox.put(EngineDead(reason=str(e)))
        code = 1
    finally:
        core.shutdown()
        outbox.put(None)
        writer.join(timeout=5)
        out.close(linger=1000)
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="encore-engine")
    ap.add_argument("--in", dest="inbox", required=True)
    ap.add_argument("--out", dest="outbox", required=True)
    ap.add_argument("--model-name", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ignore_group_signals()
    exit_with_parent()
    config = read_config()
    return run_engine(config, args.inbox, args.outbox, args.model_name)


if __name__ == "__main__":
    sys.exit(main())
