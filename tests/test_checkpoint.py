"""The checkpoint format: random streams continue where they were, nothing in a checkpoint can run
code when it is read, and a file of another format or another program is named, not half-read."""
import random

import pytest
import torch

from pipelines import checkpoint
from pipelines.checkpoint import CheckpointError, find_checkpoint, load_state
from pipelines.config import ConfigError

STATE = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scaler": {}, "epoch": 3, "step": 30, "warming": False,
         "history": [{"epoch": 3, "val_error": 0.25}], "mlflow_run_id": "abc", "model_name": "cifar_resnet8",
         "num_classes": 10, "config": {"model": {"depth": 8}}}


def test_a_resumed_worker_draws_what_it_would_have_drawn(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    checkpoint.save(str(tmp_path), 0, checkpoint.rng_state(), STATE)
    expected = (torch.rand(3), random.random())

    torch.manual_seed(99)
    random.seed(99)
    assert checkpoint.restore_rng(str(tmp_path), 0)
    torch.testing.assert_close(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert not checkpoint.restore_rng(str(tmp_path), 1)  # a rank the run did not have: fresh streams

    state = load_state(tmp_path, need=checkpoint.STATE_KEYS)
    assert state["format"] == checkpoint.FORMAT and state["epoch"] == 3


class Payload:
    """What an attacker with write access to the storage path would plant."""

    def __reduce__(self):
        return (open, ("/tmp/ray-resnet-pwned", "w"))


def test_nothing_in_a_checkpoint_runs_code_when_read(tmp_path):
    import os
    if os.path.exists("/tmp/ray-resnet-pwned"):
        os.remove("/tmp/ray-resnet-pwned")
    torch.save({"python": Payload()}, tmp_path / "rng-0.pt")
    torch.save({**STATE, "history": Payload()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path}/rng-0.pt: cannot restore the random streams"):
        checkpoint.restore_rng(str(tmp_path), 0)
    with pytest.raises(CheckpointError, match=f"{tmp_path}/state.pt: not a checkpoint pipelines.train wrote"):
        load_state(tmp_path)
    assert not os.path.exists("/tmp/ray-resnet-pwned")


def test_another_format_or_a_missing_key_is_named(tmp_path):
    torch.save({**STATE, "format": "ray-resnet-checkpoint/9"}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="checkpoint format 'ray-resnet-checkpoint/9'; this version reads "
                                              "'ray-resnet-checkpoint/1'"):
        load_state(tmp_path)
    torch.save({k: v for k, v in STATE.items() if k != "optimizer"}, tmp_path / "state.pt")
    assert load_state(tmp_path)["epoch"] == 3  # reading a model needs no optimizer ...
    with pytest.raises(CheckpointError, match=r"state.pt: not a checkpoint pipelines.train wrote \(no optimizer\)"):
        load_state(tmp_path, need=checkpoint.STATE_KEYS)  # ... resuming does
    torch.save({k: v for k, v in STATE.items() if k != "history"}, tmp_path / "state.pt")
    with pytest.raises(ConfigError, match=r"state.pt: not a checkpoint pipelines.train wrote \(no history\); give a "
                                          r"checkpoint_\* directory"):
        find_checkpoint(str(tmp_path))


def test_a_full_disk_leaves_no_partial_checkpoint_and_says_where(small_disk):
    disk = small_disk(256 * 1024)
    name = checkpoint.checkpoint_name(2, "2026-11-30_05-00-00")

    def write():  # a checkpoint larger than the disk, written as Ray Train's upload would
        (disk / name).mkdir()
        checkpoint.save(str(disk / name), 0, {"torch": torch.zeros(1 << 20)})  # 4 MB

    with pytest.raises(checkpoint.StorageFull) as e, checkpoint.storage_full_at(str(disk), partial=name):
        write()
    assert str(e.value).startswith(f"storage full at {disk}: the checkpoint was not written (nothing of it is left); ")
    assert list(disk.iterdir()) == []
    with pytest.raises(checkpoint.StorageFull, match=rf"^storage full at {disk}: 0\.3 MB free, a checkpoint takes 4\.4 MB"):
        checkpoint.check_space(str(disk), checkpoint.tensor_bytes({"a": [torch.zeros(1 << 20)], "b": torch.ones(10)}) + 200_000)
    checkpoint.check_space(str(disk), 100_000)  # room for it: nothing said
    with pytest.raises(OSError), checkpoint.storage_full_at(str(disk)):  # any other error passes through
        raise PermissionError(13, "Permission denied")


def test_checkpoints_of_a_discarded_attempt_are_found_by_position(tmp_path):
    # b's epoch 3 written before Ray Train got round to registering b's epoch 2: b's, so kept.
    # Within an epoch: a's step 40 of epoch 2 is at or past b's registered step 20 of it: discarded.
    for epoch, steps, attempt in [(1, 0, "a"), (1, 10, "a"), (1, 40, "a"), (2, 0, "a"), (3, 0, "a"), (1, 20, "b"),
                                  (2, 0, "b"), (3, 0, "b")]:
        (tmp_path / checkpoint.checkpoint_name(epoch, attempt, steps)).mkdir()
    (tmp_path / "checkpoint_2024-01-01_00-00-00.000000").mkdir()  # Ray's own naming: not ours to judge
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    assert checkpoint.position(checkpoint.checkpoint_name(1, "2026-11-30_05-00-00", 20)) == (1, 20)
    assert checkpoint.position(checkpoint.checkpoint_name(2, "2026-11-30_05-00-00")) == (2, 0)
    kept = checkpoint.checkpoint_name(1, "b", 20)
    assert sorted(checkpoint.discarded_checkpoints(str(tmp_path), kept)) == [
        "checkpoint_000001_s000000040_a", "checkpoint_000002_a", "checkpoint_000003_a"]
    checkpoint.remove_checkpoints(str(tmp_path), checkpoint.discarded_checkpoints(str(tmp_path), kept))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_000001_a", "checkpoint_000001_s000000010_a", "checkpoint_000001_s000000020_b",
        "checkpoint_000002_b", "checkpoint_000003_b", "checkpoint_2024-01-01_00-00-00.000000",
        "checkpoint_manager_snapshot.json"]


def test_the_final_model_is_the_latest_checkpoint_unless_that_one_was_taken_within_an_epoch(tmp_path):
    # Ray Train's best_checkpoints holds the best keep_best (2) by validation error, which need not
    # include the latest. A run stopped within epoch 5 and rerun with schedule.epochs=4: the latest
    # is the one within epoch 5, whose weights are no epoch's model; epoch 4's end was not kept.
    from types import SimpleNamespace

    def saved(name, epoch, val_error, **more):
        (tmp_path / name).mkdir()
        torch.save({**STATE, "epoch": epoch, "history": [{"epoch": epoch, "val_error": val_error}], **more},
                   tmp_path / name / "state.pt")
        return str(tmp_path / name), {"epoch": epoch, "val_error": val_error, **more}

    ep2, ep3, ep4 = saved("ep2", 2, 0.20), saved("ep3", 3, 0.25), saved("ep4", 4, 0.30)
    finished = SimpleNamespace(best_checkpoints=[ep2, ep3], checkpoint=ep4[0])
    latest = load_state(finished.checkpoint)
    assert checkpoint.final_state(finished, latest) is latest
    assert checkpoint.best_checkpoint(finished)[0] == ep2[0]
    within = saved("ep5-step10", 4, 2.0, partial={"steps": 10})
    stopped = SimpleNamespace(best_checkpoints=[ep2, ep3, within], checkpoint=within[0])
    assert checkpoint.final_state(stopped, load_state(stopped.checkpoint))["epoch"] == 3
    assert checkpoint.best_checkpoint(stopped)[0] == ep2[0]
