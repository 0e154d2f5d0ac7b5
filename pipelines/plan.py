"""Which rows each worker trains, step by step: the same recipe and every image once per epoch,
whatever the number of workers and however often the epoch is interrupted. No Ray here.

    units = read_units(shards)                    # runs of a shard's row groups, rows numbered globally
    order = epoch_order(units, seed, epoch)       # a function of (seed, epoch) alone
    rows = rank_rows(order, done, steps_left, batch, world, rank)   # this rank's rows for the rest of the epoch
    rows = worker_rows(units, seed, epoch, batch, world, rank, done, steps_done)   # the same, in one call
    rows = validation_rows(val_rows, world, rank)                   # this rank's share of validation
    for unit, local in read_runs(units, rows): ...                  # what to read, unit by unit

The rule (docs/elastic.md):
- an epoch has N // B steps of the global batch B, whatever the world size W; the N mod B rows
  last in the epoch's order are not trained that epoch (a different set each epoch);
- at each step rank r trains q_r = B // W rows, one more for r < B mod W: the step trains B rows;
- a rank's rows for the rest of the epoch are one contiguous slice of the rows not yet trained,
  in the epoch's order: rank 0 the first S * q_0, rank 1 the next S * q_1, ..., S steps left;
- which rows were trained is recorded by row number (`done`, one flag per row), so a checkpoint
  taken after any step, resumed with any W, continues the epoch with exactly the rows left.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Rows per read task (whole Parquet row groups of one shard). Ray Data left a CPU idle for about
# 0.2 s between one task and the next, so tasks of one 256-row group (0.3 s of decoding) lost a
# third of the time; much longer ones leave a long tail at the end of each epoch.
ROWS_PER_TASK = 1024


class Unit(NamedTuple):
    path: str                 # the shard
    groups: list[int]         # its row groups, consecutive
    group_rows: list[int]     # their rows
    first: int                # the global number of its first row (shards in manifest order)

    @property
    def rows(self) -> int:
        return sum(self.group_rows)


def read_units(shards: list[tuple[str, int, list[int]]]) -> list[Unit]:
    """check_shards' (path, bytes, rows per row group) as units of up to ROWS_PER_TASK rows."""
    units, first = [], 0
    for path, _, groups in shards:
        start, rows = 0, 0
        for i, n in enumerate(groups):
            rows += n
            if rows >= ROWS_PER_TASK or i == len(groups) - 1:
                units.append(Unit(path, list(range(start, i + 1)), list(groups[start:i + 1]), first))
                first += rows
                start, rows = i + 1, 0
    return units


def epoch_order(units: list[Unit], seed: int, epoch: int) -> np.ndarray:
    """Every row's global number, in the epoch's order: the units shuffled, and the rows within each.
    Rows of a unit stay together, so a worker reads a few whole row groups, not rows from everywhere."""
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for k in rng.permutation(len(units)):
        u = units[k]
        parts.append(u.first + np.random.default_rng([seed, epoch, int(k)]).permutation(u.rows))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def rank_batches(batch: int, world: int) -> list[int]:
    """Each rank's rows per step: the global batch split as evenly as it goes."""
    return [batch // world + (r < batch % world) for r in range(world)]


def steps_per_epoch(rows: int, batch: int) -> int:
    return rows // batch


def rank_rows(order: np.ndarray, done: np.ndarray | None, steps_left: int, batch: int, world: int,
              rank: int) -> np.ndarray:
    """Rank's rows for the epoch's steps_left remaining steps, in order: its slice of the rows not done."""
    left = order if done is None else order[~done[order]]
    q = rank_batches(batch, world)
    start = steps_left * sum(q[:rank])
    return left[start:start + steps_left * q[rank]]


def worker_rows(units: list[Unit], seed: int, epoch: int, batch: int, world: int, rank: int,
                done: np.ndarray | None = None, steps_done: int = 0) -> np.ndarray:
    """A rank's rows for the rest of the epoch (from steps_done, without the rows done): its
    rank_rows of the epoch's order."""
    rows = sum(u.rows for u in units)
    return rank_rows(epoch_order(units, seed, epoch), done, steps_per_epoch(rows, batch) - steps_done, batch, world,
                     rank)


def validation_rows(rows: int, world: int, rank: int) -> np.ndarray:
    """Rank's share of the validation split, in order: one contiguous slice, the shares differing by
    at most a row, none dropped (a validation step need not match across workers)."""
    return np.arange(rank * rows // world, (rank + 1) * rows // world)


def read_runs(units: list[Unit], rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """rows (global numbers, in order) as (unit index, row positions within it) runs, in the same order."""
    if not len(rows):
        return []
    firsts = np.array([u.first for u in units])
    unit = np.searchsorted(firsts, rows, side="right") - 1
    breaks = np.flatnonzero(np.diff(unit)) + 1
    return [(int(unit[s]), rows[s:e] - firsts[unit[s]])
            for s, e in zip(np.r_[0, breaks], np.r_[breaks, len(rows)])]


def pack(done: np.ndarray) -> np.ndarray:
    """One bit a row, for the checkpoint: ImageNet's 1.28M rows take 160 kB."""
    return np.packbits(done)


def unpack(packed: np.ndarray, rows: int) -> np.ndarray:
    return np.unpackbits(np.asarray(packed, np.uint8), count=rows).astype(bool)
