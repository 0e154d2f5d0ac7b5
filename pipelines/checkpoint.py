"""The checkpoint format, once: what a training run writes each epoch, how it is read back.

A checkpoint is a directory, <storage_path>/<run.name>/checkpoint_<epoch>_<attempt> at an epoch's
end, checkpoint_<epochs done>_s<steps into the next>_<attempt> within an epoch (Ray Train copies it
there; the attempt is when the worker group started, so a failed attempt's copy of an epoch never
mixes with the next attempt's):
    state.pt     rank 0: FORMAT, weights, optimizer and grad-scaler state, epoch, step, the
                 warm-up flag, every epoch's metrics (history), the MLflow run id, the model's
                 name and classes, and the config it trained with (a dict); within an
                 epoch, `partial`: the epoch's steps done, its rows done (a bit each,
                 pipelines.plan.pack) and its running sums
    rng-<r>.pt   each rank's random streams (torch, Python, CUDA) as tensors and
                 plain lists, so a resumed run with the same workers draws what it would have drawn

Every file is read with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts
only, so a file planted in the storage path cannot run code in the workers that resume from it.
Beside the checkpoints, a run directory holds small text files (config.yaml, mlflow_run_id):
read_text / save_text, on a local path or an s3:// / gs:// URI. Every function here that takes a
place takes a URI, or the (filesystem, path) that pipelines.shards.fs_and_path made of one on the
driver: that is what travels to Ray's processes, whose environment may lack the driver's settings.
"""
from __future__ import annotations

import contextlib
import errno
import io
import random
import re
import shutil
from pathlib import Path

import pyarrow.fs
import torch

from pipelines.config import ConfigError
from pipelines.shards import fs_and_path, storage_error, storage_hint

Place = str | tuple[pyarrow.fs.FileSystem, str]  # a URI, or fs_and_path's (filesystem, path) of one


def _fs(where: Place) -> tuple[pyarrow.fs.FileSystem, str]:
    return where if isinstance(where, tuple) else fs_and_path(where)

FORMAT = "ray-resnet-checkpoint/1"
# What training writes into state.pt, and what reading a model back needs of it.
STATE_KEYS = ("format", "model", "optimizer", "scaler", "epoch", "step", "warming", "history", "mlflow_run_id",
              "model_name", "num_classes", "config")
MODEL_KEYS = ("model", "config", "history", "epoch", "model_name")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the file and what is wrong with it."""


class StorageFull(RuntimeError):
    """No space left where a checkpoint goes: says where, and that the same command resumes."""


def checkpoint_name(epoch: int, attempt: str, steps: int = 0) -> str:
    """epoch: epochs done; steps: steps done of the next (a checkpoint within an epoch)."""
    return f"checkpoint_{epoch:06d}_{f's{steps:09d}_' if steps else ''}{attempt}"


NAMED = re.compile(r"checkpoint_(\d{6})_(?:s(\d{9})_)?(.+)")  # checkpoint_name's: epoch, steps, attempt


def position(name: str) -> tuple[int, int] | None:
    """(epochs done, steps into the next) of a checkpoint_name, or None for another name."""
    m = NAMED.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state: what its checkpoint file will take, nearly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_space(uri: str, need: int) -> None:
    """Refuse to train an epoch whose checkpoint cannot be written: a local (or mounted) storage
    path with less than `need` bytes free. Object storage has no such limit to check (and this
    runs in a worker, which builds no filesystem for it)."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        while not Path(path).exists():  # not made yet: the filesystem it will be made on
            path = str(Path(path).parent)
        free = shutil.disk_usage(path).free
        if free < need:
            raise StorageFull(f"storage full at {path}: {free / 1e6:.1f} MB free, a checkpoint takes "
                              f"{need / 1e6:.1f} MB; free space there and run the same command to resume "
                              "from the last checkpoint")


@contextlib.contextmanager
def storage_full_at(where: str, partial: str | None = None):
    """A full disk inside the block becomes StorageFull naming `where`, after removing the partial
    checkpoint directory where/partial (nothing later finds half a checkpoint)."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        if partial:
            remove_checkpoints(where, [partial])
        raise StorageFull(f"storage full at {where}: the checkpoint was not written (nothing of it is left); "
                          "free space there and run the same command to resume from the last checkpoint") from None


def save(directory: str, rank: int, rng: dict, state: dict | None = None) -> None:
    """Write rank's random streams into directory, and state.pt when given (rank 0)."""
    _save(rng, f"{directory}/rng-{rank}.pt")
    if state is not None:
        missing = [k for k in STATE_KEYS if k != "format" and k not in state]
        if missing:
            raise ValueError(f"state.pt: missing {', '.join(missing)}")  # a bug in the caller, not the user
        _save({"format": FORMAT, **state}, f"{directory}/state.pt")


def _save(obj, path: str) -> None:
    """torch.save through memory: on a full disk torch.save's own writer fails with an internal
    assertion, a plain write with OSError(ENOSPC), which storage_full_at recognises."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def load_state(where, need: tuple[str, ...] = MODEL_KEYS) -> dict:
    """state.pt of a checkpoint directory (a local path, a Ray Checkpoint, or (filesystem, path) of
    one in an object store), checked for its format and the keys the caller needs. A state.pt
    without a format key predates the key and has the same layout."""
    if hasattr(where, "as_directory"):  # a ray.train.Checkpoint: a local copy for the duration
        with where.as_directory() as d:
            return load_state(d, need)
    if isinstance(where, tuple):
        fs, inside = where[0], f"{where[1]}/state.pt"
        path = f"{ {'gcs': 'gs'}.get(fs.type_name, fs.type_name)}://{inside}"  # as the user wrote it

        def source():
            with fs.open_input_stream(inside) as f:
                return io.BytesIO(f.read())
    else:
        path = Path(where) / "state.pt"

        def source():
            return path
    try:
        state = torch.load(source(), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a checkpoint pipelines.train wrote ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint pipelines.train wrote (a {type(state).__name__})")
    if state.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r}; this version reads {FORMAT!r}")
    missing = [k for k in need if k != "format" and k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint pipelines.train wrote (no {', '.join(missing)})")
    return state


def rng_state() -> dict:
    """This process's random streams, as tensors and plain lists. (The data's augmentation streams
    are functions of seed, epoch and rank: pipelines.feed.)"""
    version, internal, gauss = random.getstate()
    rng = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(directory: str, rank: int) -> bool:
    """Continue rank's random streams from a checkpoint; False when it has none for this rank (the
    run resumed with more workers than it had)."""
    path = Path(directory, f"rng-{rank}.pt")
    if not path.exists():
        return False
    try:
        rng = torch.load(path, weights_only=True)
        version, internal, gauss = rng["python"]
        torch.set_rng_state(rng["torch"])
        random.setstate((version, tuple(internal), gauss))
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore the random streams ({type(e).__name__}: {e}); "
                              "remove the file to resume with fresh ones") from None
    return True


def best_checkpoint(result):
    """(checkpoint, metrics) of the lowest validation error among the epoch ends Ray Train kept, or None."""
    ends = [cm for cm in result.best_checkpoints if not cm[1].get("partial")]
    return min(ends, key=lambda cm: cm[1]["val_error"]) if ends else None


def final_state(result, latest: dict) -> dict:
    """state.pt of the run's final model: latest's (the latest checkpoint's), unless that one was
    taken within an epoch (a rerun lowered schedule.epochs below it: its weights are no epoch's
    model); then the newest epoch end among the best Ray Train kept (keep_best: one within an epoch
    reports a worse validation error than any epoch end)."""
    if not latest.get("partial"):
        return latest
    ends = [cm for cm in result.best_checkpoints if not cm[1].get("partial")]
    return load_state(max(ends, key=lambda cm: cm[1]["epoch"])[0]) if ends else latest


def find_checkpoint(path: str) -> tuple[dict, str]:
    """(state.pt's contents, the checkpoint directory) for a command line's PATH, a local path or an
    s3:// / gs:// URI: PATH itself when it holds a state.pt, else the checkpoint_* directory of the
    run directory PATH with the lowest validation error."""
    accepted = "give a checkpoint_* directory of a run or a run directory"
    fs, root = fs_and_path(path)
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    shown = root if local else path.rstrip("/")  # how messages and the result name it
    try:
        if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
            raise ConfigError(f"{path}: no such directory; {accepted}{storage_hint(path)}")
        itself = fs.get_file_info(f"{root}/state.pt").type == pyarrow.fs.FileType.File  # a checkpoint
        names = [] if itself else sorted(
            i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    except OSError as e:  # an object store: no such bucket, credentials refused, the network
        raise ConfigError(f"{path}: cannot read it ({storage_error(e)}){storage_hint(path)}") from None

    def load(name: str | None) -> dict:
        inside = f"{root}/{name}" if name else root
        return load_state(inside if local else (fs, inside))

    if itself:
        try:
            return load(None), shown
        except CheckpointError as e:
            raise ConfigError(f"{e}; {accepted}") from None
    states, unreadable = {}, []
    for name in names:
        try:  # a run's folder may hold one a failed write left behind (storage full, a node lost)
            state = load(name)
            if not state.get("partial"):  # one within an epoch is no model to evaluate
                states[name] = state
        except CheckpointError as e:
            unreadable.append(f"{name} ({str(e).split('state.pt: ', 1)[-1]})")
    if unreadable:
        print(f"{path}: skipped {len(unreadable)} unreadable checkpoint(s): {'; '.join(unreadable)}", flush=True)
    if not states:
        raise ConfigError(f"{path}: no state.pt and no checkpoint_* directories holding a readable one; {accepted}")
    best = min(states, key=lambda c: states[c]["history"][-1]["val_error"])
    row = states[best]["history"][-1]
    print(f"{path}: picked {best} (epoch {row['epoch']}, validation error {row['val_error']:.2%}), "
          f"the lowest of {len(states)} checkpoints", flush=True)
    return states[best], f"{shown}/{best}"


# ---------------------------------------------------------------------------------------------
# Small files beside a run's checkpoints: local paths or s3:// / gs:// URIs

def save_text(uri: Place, name: str, text: str) -> None:
    fs, path = _fs(uri)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):  # an object store has no folders to make
        fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())


def read_text(uri: Place, name: str) -> str | None:
    """The file's text, or None when it is not there."""
    fs, path = _fs(uri)
    try:
        with fs.open_input_stream(f"{path}/{name}") as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def remove_checkpoints(uri: Place, names: list[str]) -> None:
    fs, path = _fs(uri)
    for name in names:
        try:
            fs.delete_dir(f"{path}/{name}")
        except (FileNotFoundError, OSError):
            pass


def discarded_checkpoints(uri: Place, kept: str) -> list[str]:
    """The checkpoint directories at kept's position or later from another attempt than `kept`,
    which Ray Train has just registered: copies from an attempt a failure discarded (a worker lost
    after writing its checkpoint but before Ray Train registered it), which nothing resumes from.
    Kept's own attempt may be epochs ahead by now (Ray Train registers a report when it next polls
    the workers): its later checkpoints are not discarded."""
    if not (named := NAMED.fullmatch(kept)):  # not a name of ours: no attempt to tell apart
        return []
    fs, path, attempt, at = *_fs(uri), named.group(3), position(kept)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
            and (m := NAMED.fullmatch(i.base_name)) and position(i.base_name) >= at and m.group(3) != attempt]


def epochs_done(uri: Place) -> int | None:
    """The most epochs a checkpoint in uri has finished, by its name (0 for a name not of ours); None
    without a checkpoint."""
    fs, path = _fs(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    done = [(position(i.base_name) or (0, 0))[0] for i in infos
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    return max(done, default=None)
