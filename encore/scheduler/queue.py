"""Waiting-queue policies, chosen by name from ``QUEUE_POLICIES``.

Every policy has the same interface (add, pop, peek, remove, prepend, iteration, len) and a
``key(seq)`` that orders sequences best-first; the scheduler also sorts its running list by
that key, so the last running sequence is always the first to be preempted.

- ``fcfs``: engine arrival order (``Seq.order``). A preempted sequence goes back to the front.
- ``priority``: lower ``priority`` first, then arrival order. A preempted sequence goes back to
  its priority place (which is also near the front of its class, since it arrived earlier).
- ``program_fcfs`` (Continuum): a program's (``prompt_cache_key``'s) later turns are ordered by
  the arrival of its first request, so an agent's next turn after a tool call is not queued
  behind programs that started after it. Requests without a program are plain FCFS.
"""

from __future__ import annotations

import abc
import bisect
from collections import OrderedDict, deque
from collections.abc import Iterator, MutableSequence

from encore.scheduler.request import Seq


class WaitingQueue(abc.ABC):
    """Sequences waiting for their (first or resumed) admission, best first in ``_q``.

    Subclasses choose the container (a deque or a sorted list) and how to add and pop;
    peeking, removal, iteration and length are the same for both.
    """

    name: str
    _q: MutableSequence[Seq]

    @staticmethod
    @abc.abstractmethod
    def key(seq: Seq) -> tuple[int, ...]:
        """Sort key, smaller = served first and preempted last."""

    @abc.abstractmethod
    def add(self, seq: Seq) -> None:
        """Enqueue a newly arrived sequence."""

    @abc.abstractmethod
    def prepend(self, seq: Seq) -> None:
        """Re-enqueue a preempted sequence ahead of those that arrived after it."""

    @abc.abstractmethod
    def pop(self) -> Seq:
        """Remove and return the next sequence (IndexError when empty)."""

    def peek(self) -> Seq:
        """The next sequence to admit (IndexError when empty)."""
        return self._q[0]

    def remove(self, seq: Seq) -> None:
        """Remove ``seq`` (ValueError when absent)."""
        self._q.remove(seq)

    def __iter__(self) -> Iterator[Seq]:
        return iter(self._q)

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSQueue(WaitingQueue):
    name = "fcfs"

    def __init__(self) -> None:
        self._q: deque[Seq] = deque()

    @staticmethod
    def key(seq: Seq) -> tuple[int, ...]:
        return (seq.order,)

    def add(self, seq: Seq) -> None:
        self._q.append(seq)

    def prepend(self, seq: Seq) -> None:
        self._q.appendleft(seq)

    def pop(self) -> Seq:
        return self._q.popleft()


class SortedQueue(WaitingQueue):
    """Kept sorted by ``key``; insertion is O(n), which is fine at queue sizes we serve."""

    def __init__(self) -> None:
        self._q: list[Seq] = []

    def add(self, seq: Seq) -> None:
        bisect.insort(self._q, seq, key=self.key)

    def prepend(self, seq: Seq) -> None:
        self.add(seq)

    def pop(self) -> Seq:
        return self._q.pop(0)


class PriorityQueue(SortedQueue):
    name = "priority"

    @staticmethod
    def key(seq: Seq) -> tuple[int, ...]:
        return (seq.priority, seq.order)


class ProgramFCFSQueue(SortedQueue):
    """Orders by the first arrival of each sequence's program (then by its own arrival)."""

    name = "program_fcfs"
    MAX_PROGRAMS = 65_536  # first arrivals remembered (least recently seen forgotten first)

    def __init__(self) -> None:
        super().__init__()
        self._first: OrderedDict[str, int] = OrderedDict()

    @staticmethod
    def key(seq: Seq) -> tuple[int, ...]:
        return (seq.program_order, seq.order)

    def add(self, seq: Seq) -> None:
        if seq.program is not None:
            seq.program_order = self._first.setdefault(seq.program, seq.order)
            self._first.move_to_end(seq.program)
            if len(self._first) > self.MAX_PROGRAMS:
                self._first.popitem(last=False)
        super().add(seq)


QUEUE_POLICIES: dict[str, type[WaitingQueue]] = {
    "fcfs": FCFSQueue, "priority": PriorityQueue, "program_fcfs": ProgramFCFSQueue}


def make_queue(name: str) -> WaitingQueue:
    """The queue policy named ``name``; ValueError naming the allowed ones otherwise."""
    try:
        return QUEUE_POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"scheduler.policy={name!r} is not a queue policy; choose one of "
            f"{sorted(QUEUE_POLICIES)}"
        ) from None
