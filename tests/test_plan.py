"""pipelines.plan: every row once per epoch, whatever the workers and the interruptions. No Ray."""
import numpy as np
import pytest

from pipelines import plan

# Three shards: row groups of 256 rows, a short last group each; units of up to 1024 rows.
SHARDS = [("a.parquet", 0, [256] * 5 + [100]), ("b.parquet", 0, [256, 256, 7]), ("c.parquet", 0, [300] * 4)]
UNITS = plan.read_units(SHARDS)
N = sum(sum(g) for _, _, g in SHARDS)


def test_units_number_every_row_once_in_manifest_order():
    assert [(u.path, u.groups, u.rows) for u in UNITS] == [
        ("a.parquet", [0, 1, 2, 3], 1024), ("a.parquet", [4, 5], 356), ("b.parquet", [0, 1, 2], 519),
        ("c.parquet", [0, 1, 2, 3], 1200)]
    assert [u.first for u in UNITS] == [0, 1024, 1380, 1899] and N == 3099


def test_epoch_order_is_a_permutation_of_seed_and_epoch():
    a = plan.epoch_order(UNITS, seed=0, epoch=1)
    assert sorted(a.tolist()) == list(range(N))
    assert np.array_equal(a, plan.epoch_order(UNITS, seed=0, epoch=1))
    assert not np.array_equal(a, plan.epoch_order(UNITS, seed=0, epoch=2))
    assert not np.array_equal(a, plan.epoch_order(UNITS, seed=1, epoch=1))
    # a unit's rows stay together: a worker reads a few whole row groups, not rows from everywhere
    unit_of = np.searchsorted([u.first for u in UNITS], a, side="right")
    assert (np.diff(unit_of) != 0).sum() == len(UNITS) - 1


@pytest.mark.parametrize("batch,world", [(128, 1), (128, 3), (100, 7), (5, 5)])
def test_rank_batches_make_the_global_batch(batch, world):
    q = plan.rank_batches(batch, world)
    assert sum(q) == batch and max(q) - min(q) <= 1 and q == sorted(q, reverse=True)


@pytest.mark.parametrize("rows,world", [(3099, 1), (3099, 4), (360, 7), (5, 8)])
def test_validation_shares_cover_the_split_once_in_order(rows, world):
    shares = [plan.validation_rows(rows, world, r) for r in range(world)]
    assert np.array_equal(np.concatenate(shares), np.arange(rows))  # every row once, none dropped
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def train(order, done, steps_left, batch, world, steps, rng, trained):
    """steps of training with world workers, each taking its rows in a shuffled order (a local
    shuffle buffer): the rows trained go into trained (a list per step) and done."""
    mine = [list(plan.rank_rows(order, done, steps_left, batch, world, r)) for r in range(world)]
    q = plan.rank_batches(batch, world)
    assert [len(m) for m in mine] == [steps_left * n for n in q]
    for _ in range(steps):
        step = []
        for r in range(world):
            take = rng.choice(len(mine[r]), size=q[r], replace=False)
            step += [mine[r][i] for i in take]
            mine[r] = [row for i, row in enumerate(mine[r]) if i not in set(take.tolist())]
        trained.append(step)
        done[step] = True


@pytest.mark.parametrize("worlds", [[(3, None)], [(3, 5), (2, 4), (5, None)], [(1, 1), (4, 1), (2, None)]])
def test_every_row_once_per_epoch_across_interruptions(worlds):
    """The epoch is interrupted after some steps, each time resumed with other workers from what a
    checkpoint keeps (the steps done, the rows done packed to bits): no row twice, none skipped but
    the epoch's last N mod B rows, and every step trains the global batch."""
    batch, rng = 64, np.random.default_rng(0)
    order = plan.epoch_order(UNITS, seed=3, epoch=2)
    total = plan.steps_per_epoch(N, batch)
    done, trained, steps_done = np.zeros(N, bool), [], 0
    for world, steps in worlds:
        steps = total - steps_done if steps is None else steps
        train(order, done, total - steps_done, batch, world, steps, rng, trained)
        steps_done += steps
        done = plan.unpack(plan.pack(done), N)  # through a checkpoint
    rows = [row for step in trained for row in step]
    assert len(trained) == total and all(len(step) == batch for step in trained)
    assert len(rows) == len(set(rows)) == total * batch
    assert set(range(N)) - set(rows) == set(order[total * batch:].tolist())  # the last N mod B, in order


def test_read_runs_say_what_to_read_in_order():
    rows = plan.rank_rows(plan.epoch_order(UNITS, 0, 1), None, 10, 64, 3, 1)
    runs = plan.read_runs(UNITS, rows)
    assert np.array_equal(np.concatenate([UNITS[k].first + local for k, local in runs]), rows)
    assert all((local >= 0).all() and (local < UNITS[k].rows).all() for k, local in runs)
    assert plan.read_runs(UNITS, rows[:0]) == []
