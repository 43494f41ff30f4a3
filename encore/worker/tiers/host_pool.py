"""The host tier's blocks: one pinned tensor per layer group."""

from __future__ import annotations

import torch


class HostPool:
    """The host tier's blocks, one pinned tensor per layer group: group ``g`` holds layers
    ``bounds[g]`` of every slot, encoded (``codec``), ``[slots, layers_in_group,
    layer_bytes]`` uint8, so a run of consecutive slots is one contiguous copy per group and a
    load can hand the forward pass its first layers while later groups are still on the way."""

    def __init__(self, num: int, layers: int, layer_bytes: int, pin: bool, groups: int) -> None:
        # group 0 is one layer: the forward pass waits for its copies before computing
        # anything; the others are split evenly (each copies while the previous computes)
        rest = min(groups, layers) - 1
        edges = [0, *(1 + (layers - 1) * g // rest for g in range(rest + 1))] if rest else [
            0, layers]
        self.bounds = [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]
        self.parts = [torch.zeros((num, b - a, layer_bytes), dtype=torch.uint8, pin_memory=pin)
                      for a, b in self.bounds]

    def __len__(self) -> int:
        return self.parts[0].shape[0]

    def block(self, slot: int) -> torch.Tensor:
        """One slot's encoded block, ``[layers, layer_bytes]`` (a copy unless there is one
        group): the bytes of a disk file's payload."""
        if len(self.parts) == 1:
            return self.parts[0][slot]
        return torch.cat([part[slot] for part in self.parts])


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """``(row, first slot, length)`` for each run of consecutive values in ``slots``."""
    runs: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if runs and slot == runs[-1][1] + runs[-1][2]:
            r, first, n = runs[-1]
            runs[-1] = (r, first, n + 1)
        else:
            runs.append((row, slot, 1))
    return runs
