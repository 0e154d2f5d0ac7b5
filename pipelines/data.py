"""Shards -> Ray Data -> training batches: the input stage between pipelines.shards and pipelines.train.

    ds = planned_dataset(cfg.data, fs, units, runs)              # a worker's rows (pipelines.plan)
    train_ds, val_ds, manifest = build_datasets(cfg.data, seed)  # or each split whole (benchmarks)
    for batch in epoch_batches(ds, cfg.data, epoch, seed, batch_size, train=True):
        x, y = to_device(batch, device, cfg.data, channels_last)  # uint8 NHWC -> normalised float

Reading starts from the manifest: every shard it lists must be there, whole and unaltered, or the
read stops with the shard's name. Images are decoded and augmented in Ray Data `map_batches` tasks
on the CPUs training does not use, and travel as uint8 (a quarter of float32's bytes); the
training device normalises them. The transforms are torchvision's (applied per image without
T.Compose's per-call machinery), testable alone.
"""
from __future__ import annotations

import fcntl
import functools
import io
import logging
import math
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import Datasource, ReadTask
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from pipelines.codecs import JPEG_MAGIC, decode_image
from pipelines.config import HOME, DataSection
from pipelines.plan import read_units
from pipelines.ray_internals import execution_count
from pipelines.shards import ShardError, check_shards, fs_and_path, load_manifest

log = logging.getLogger(__name__)

# AlexNet / fb.resnet.torch PCA lighting: eigenvalues and eigenvectors of ImageNet's RGB covariance
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class ShardSource(Datasource):
    """The checked shards as Ray Data read tasks: runs of a shard's Parquet row groups (256 images
    each) of up to ROWS_PER_TASK rows.

    Why not read_parquet: Ray 2.60's lists the files and reads their footers through 32 new actors
    at the start of every epoch (0.5-1 s on a laptop, before the first image); check_shards has
    read the footers once already. With a seed, the tasks come in a new order each execution (each
    epoch), drawn from the seed and Ray's count of the dataset's executions (what Ray's own
    FileShuffleConfig uses).
    """

    def __init__(self, shards: list[tuple[str, int, list[int]]], fs, columns: list[str] | None, seed: int | None,
                 skip_damaged: bool = False):
        self.units = read_units(shards)
        self.fs, self.columns, self.seed, self.skip_damaged = fs, columns, seed, skip_damaged
        self.bytes, self.rows = sum(size for _, size, _ in shards), sum(u.rows for u in self.units)

    def estimate_inmemory_data_size(self) -> int:
        return self.bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        order = range(len(self.units))
        if self.seed is not None:
            order = np.random.default_rng([self.seed, execution_count(data_context)]).permutation(len(self.units))
        tasks = []
        for k in order:
            u = self.units[k]
            meta = BlockMetadata(num_rows=u.rows, size_bytes=self.bytes * u.rows // max(self.rows, 1),
                                 input_files=[u.path], exec_stats=None)
            tasks.append(ReadTask(functools.partial(_read_row_groups, self.fs, u.path, u.groups, self.columns,
                                                    self.skip_damaged), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


class PlanSource(Datasource):
    """Given rows of the shards, in a given order (pipelines.plan: one worker's rows for the rest of
    an epoch), as read tasks of one unit each, every row with its global number in an `idx` column:
    what a checkpoint records as trained. Only the row groups holding those rows are read."""

    def __init__(self, units: list, runs: list[tuple[int, np.ndarray]], fs, columns: list[str],
                 skip_damaged: bool = False):
        self.units, self.runs, self.fs, self.columns, self.skip_damaged = units, runs, fs, columns, skip_damaged

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for k, local in self.runs:
            u = self.units[k]
            meta = BlockMetadata(num_rows=len(local), size_bytes=None, input_files=[u.path], exec_stats=None)
            tasks.append(ReadTask(functools.partial(_read_rows, self.fs, u, local, self.columns, self.skip_damaged),
                                  meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _read_rows(fs, unit, local: np.ndarray, columns: list[str], skip_damaged: bool):
    """The unit's rows at positions local (in that order), with their global numbers as idx."""
    ends = np.cumsum(unit.group_rows)
    which = np.searchsorted(ends, local, side="right")  # each row's group within the unit
    needed = sorted(set(which.tolist()))
    tables = list(_read_row_groups(fs, unit.path, [unit.groups[i] for i in needed], columns, skip_damaged))
    offset = dict(zip(needed, np.cumsum([0] + [len(t) for t in tables[:-1]])))
    starts = np.r_[0, ends[:-1]]
    at = np.array([offset[g] for g in which.tolist()]) + local - starts[which]
    table = pa.concat_tables(tables).take(pa.array(at))
    yield table.append_column("idx", pa.array(unit.first + local, pa.int64()))


def _read_row_groups(fs, path: str, groups: list[int], columns: list[str] | None, skip_damaged: bool = False):
    """The row groups as tables. The shard writer stores a CRC with every Parquet page and this
    read checks it: a damaged shard (the same size, other bytes) never trains as wrong pixels. It
    stops the run naming the shard and row group; with skip_damaged (data.bad_records=skip) the row
    group's rows come as rows of no image instead, which the decode skips and counts like any
    undecodable row. Shards written without CRCs read as before."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        for g in groups:
            try:
                yield pf.read_row_group(g, columns=columns)
            except OSError as e:
                damaged = f"{path}: row group {g} of {pf.num_row_groups} is damaged ({e})"
                if not skip_damaged:
                    raise ShardError(f"{damaged}; rewrite the shards (python -m pipelines.shards), or set "
                                     "data.bad_records=skip to skip its rows") from None
                n = pf.metadata.row_group(g).num_rows
                log.warning("%s: its %d rows are skipped (data.bad_records=skip)", damaged, n)
                yield _rows_of_no_image(pf.schema_arrow, columns, n, f"{path} row group {g}")


def _rows_of_no_image(schema, columns: list[str] | None, n: int, where: str):
    """n rows with empty image bytes (undecodable), keyed by where and row, -1 in number columns."""
    def column(name: str):
        kind = schema.field(name).type
        if name == "image":
            return pa.array([b""] * n, kind)
        if name == "key":
            return pa.array([f"{where} row {i}" for i in range(n)], kind)
        return pa.array([-1] * n, kind)
    names = columns or schema.names
    return pa.table([column(name) for name in names], names=names)


def read_shards(shards_dir: str, split: str, verify: str = "size", shuffle_seed: int | None = None,
                columns: list[str] | None = None, skip_damaged: bool = False):
    """The split as a streaming Ray Dataset (columns image, label, class_id, key, height, width, or
    those given).

    With shuffle_seed, the order of the read tasks (runs of row groups) is shuffled anew each epoch
    (each execution), from the seed.
    """
    import ray.data
    shards = check_shards(shards_dir, split, verify)
    fs, _ = fs_and_path(shards_dir)
    source = ShardSource(shards, fs, columns, shuffle_seed, skip_damaged)
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(source.units)))


# ---------------------------------------------------------------------------------------------
# Transforms: uint8 CHW tensor (or PIL image) -> uint8 CHW tensor of one size. No Ray here.

class ShorterSideRandomResize(torch.nn.Module):
    """The paper's scale augmentation: the shorter side resized to a random size in [lo, hi]."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, img):
        size = int(torch.randint(self.lo, self.hi + 1, ()))
        return TF.resize(img, size, antialias=True)


class RandomResizedCrop(T.RandomResizedCrop):
    """torchvision's, the same pixels, faster on a decoded image (HWC in memory).

    torchvision resizes a crop view of such an image into CHW memory, and the batch then transposes
    it back to HWC. Copying the crop out in HWC first keeps resize and output in HWC: crop, resize
    and HWC copy in 0.20 ms against 0.38 ms from a 256x192 photo (0.32 against 0.55 from 500x375).
    """

    def transform(self, inpt, params: dict):
        if not (isinstance(inpt, torch.Tensor) and inpt.ndim == 3 and inpt.stride(0) == 1):
            return super().transform(inpt, params)  # PIL, or CHW memory
        top, left, h, w = params["top"], params["left"], params["height"], params["width"]
        crop = inpt[:, top:top + h, left:left + w].permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return TF.resize(crop, self.size, interpolation=self.interpolation, antialias=self.antialias)


class Augment:
    """T.Compose(steps) for one decoded image tensor: the same random draws, the same pixels, without
    v2's per-call flattening and checking of its inputs at every step (0.1 ms an image, a third of
    RandomResizedCrop(224) + flip on a 256x192 photo, one core). PIL in: the plain Compose.
    """

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, img):
        if type(img) is not torch.Tensor:
            return T.Compose([*self.steps, T.PILToTensor()])(img)
        for step in self.steps:
            if not isinstance(step, T.Transform):
                img = step(img)
                continue
            if hasattr(step, "p") and torch.rand(1) >= step.p:  # a random-apply step (flip): v2's draw
                continue
            img = step.transform(img, step.make_params([img]))
        return img


def build_transform(data: DataSection, train: bool) -> Augment:
    c = data.crop_size
    if not train:
        steps = ([T.Resize(data.val_resize, antialias=True)] if data.val_resize else []) + [T.CenterCrop(c)]
    elif data.train_transform == "paper":
        steps = [ShorterSideRandomResize(*data.scale_range), T.RandomCrop(c, pad_if_needed=True)]
    elif data.train_transform == "rrc":
        steps = [RandomResizedCrop(c, scale=tuple(data.rrc_scale), antialias=True)]
    else:  # cifar: 4-pixel zero padding, random crop, flip (paper section 4.2)
        steps = [T.RandomCrop(c, padding=4)]
    if train and data.flip:
        steps.append(T.RandomHorizontalFlip())
    return Augment(steps)


def draft_side(data: DataSection, train: bool) -> int | None:
    """The smallest shorter side a JPEG may be decoded at without losing pixels the transform uses."""
    if not train:
        return data.val_resize
    return data.scale_range[1] if data.train_transform == "paper" else None


def decode(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """Encoded bytes -> uint8 RGB tensor, 3 x H x W (HWC in memory, which torch's resize is fastest on).

    TorchCodec's libjpeg-turbo/libpng/libwebp decoders (torchvision's where TorchCodec does not
    load: pipelines.codecs), and tensor transforms after them, ran at 1.6x PIL's rate for decode +
    RandomResizedCrop(224) on 500x375 photos, with the same pixels as PIL.
    A JPEG whose shorter side may halve or more without going under min_side is decoded at 1/2, 1/4
    or 1/8 scale in the DCT domain instead (PIL's draft); formats TorchCodec does not read go
    through PIL.
    """
    if min_side and data[:3] == JPEG_MAGIC:
        img = Image.open(io.BytesIO(data))
        scale = min_side / min(img.size)
        if scale < 0.5:
            img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            return TF.pil_to_tensor(img.convert("RGB"))
    try:
        return decode_image(data)
    except (RuntimeError, ValueError):  # another format, or damaged: PIL reads more, and says why it cannot
        return TF.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


def undecodable(data: DataSection, key: str, error: Exception) -> None:
    """A row that cannot be decoded: stop the run naming it (data.bad_records=fail), or log it."""
    if data.bad_records == "fail":
        raise ShardError(f"{key}: cannot decode ({type(error).__name__}: {error}); "
                         "set data.bad_records=skip to skip such records") from error
    log.warning("skipping %s: cannot decode (%s: %s)", key, type(error).__name__, error)


class DecodeAugment:
    """map_batches over whole read blocks (row groups): encoded rows -> decode_batch rows at a time
    of {"image": uint8 N x H x W x 3, "label", "key"}.

    Taking whole blocks lets Ray fuse the read and the decode into one task (a batch_size would
    keep them apart, with every encoded row passing through the object store in between).
    A row that fails to decode is logged with its key and kept as a placeholder, label -1 and a
    blank image (data.bad_records=skip), or stops the run naming it (fail). Placeholders travel
    with the rest, so the training loop counts them apart from the rows it drops with a final
    partial batch; it takes them out of each batch on the host (usable_rows).
    """

    def __init__(self, data: DataSection, train: bool):
        self.data, self.train = data, train
        self.transform, self.min_side = build_transform(data, train), draft_side(data, train)

    def __call__(self, block: dict):
        step = self.data.decode_batch
        carried = [k for k in ("image", "label", "key", "idx") if k in block]
        for i in range(0, len(block["key"]), step):
            yield self.decode_rows({k: block[k][i:i + step] for k in carried})

    def decode_rows(self, batch: dict) -> dict:
        if self.train:  # torch's global RNG starts equal in every process: draw fresh per batch
            torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        images, labels = [], []
        for data, label, key in zip(batch["image"], batch["label"], batch["key"]):
            try:
                images.append(self.transform(decode(data, self.min_side)).permute(1, 2, 0))
                labels.append(label)
            except Exception as e:
                undecodable(self.data, key, e)
                images.append(None)
                labels.append(-1)
        c = self.data.crop_size
        shape = next((image.shape for image in images if image is not None), (c, c, 3))
        # One C-order array: np.stack of HWC views keeps their strides, and Ray Data's conversion to
        # an Arrow block then spent longer reordering it than decoding. numpy allocates it (in huge
        # pages: torch.empty's page faults cost 0.03 ms an image); torch copies (a CHW crop into
        # HWC at twice numpy's speed).
        out = np.empty((len(images), *shape), np.uint8)
        for i, image in enumerate(images):
            if image is None:
                out[i] = 0
            else:
                torch.from_numpy(out[i]).copy_(image)
        return {"image": out, "label": np.asarray(labels, dtype=np.int64),
                "key": np.asarray(batch["key"], dtype=object),
                **({"idx": np.asarray(batch["idx"], np.int64)} if "idx" in batch else {})}


# ---------------------------------------------------------------------------------------------
# Datasets and batches

def shards_dir(data: DataSection) -> str:
    """data.shards, or the bundled digits written once to RAY_RESNET_HOME/shards/digits."""
    if data.shards:
        return data.shards
    path = HOME / "shards" / "digits"
    if not (path / "manifest.json").exists():
        from pipelines.shards import Options, load_digits_source, write_shards
        # One writer at a time: writers sharing the folder remove each other's unfinished files
        # (runs started together on a fresh home). A killed writer's lock goes with it, and the next
        # writer finishes what it left.
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".digits.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "manifest.json").exists():
                write_shards(load_digits_source(32, seed=0), path, Options(rows_per_shard=512), progress=None)
    return str(path)


def build_datasets(data: DataSection, seed: int, encoded: bool = False):
    """(train, val, manifest): lazy Ray Datasets of decoded, augmented uint8 images, or with encoded
    (data.decode=gpu) of the shards' encoded bytes, which each worker decodes (pipelines.gpu_decode)."""
    directory = shards_dir(data)
    manifest = load_manifest(directory)
    datasets = []
    for split, train in (("train", True), ("val", False)):
        ds = read_shards(directory, split, shuffle_seed=seed if train else None, columns=["image", "label", "key"],
                         skip_damaged=data.bad_records == "skip")
        datasets.append(prepared(ds, data, train, encoded))
    return datasets[0], datasets[1], manifest


def planned_dataset(data: DataSection, fs, units: list, runs: list, encoded: bool = False, train: bool = True):
    """One worker's planned rows of a split (pipelines.plan's read_runs of the shards on fs, the
    driver's fs_and_path: a worker's environment may lack its settings) as a Ray Dataset like
    build_datasets' split, with each row's global number in `idx`. Its tasks run on any node's free
    CPUs (pinned to the worker's node, they would wait for ever where workers hold every CPU)."""
    import ray.data
    source = PlanSource(units, runs, fs, ["image", "label", "key"], skip_damaged=data.bad_records == "skip")
    return prepared(ray.data.read_datasource(source, override_num_blocks=max(1, len(runs))), data, train, encoded)


def prepared(ds, data: DataSection, train: bool, encoded: bool):
    """Read rows -> decoded, augmented rows (unless encoded), with this project's execution settings."""
    if not encoded:
        ds = ds.map_batches(DecodeAugment(data, train), batch_size=None, num_cpus=1)
        # One output block per decode_batch chunk (64 crops of 224x224: 9.6 MB). A larger limit
        # merges chunks into blocks Ray Data's backpressure cannot hold back in a small object
        # store; a smaller one splits each chunk in two, and copies it again.
        ds.context.target_max_block_size = data.decode_batch * data.crop_size ** 2 * 3 + 2**16
    # Tasks finish in any order; keeping the order makes it a function of the seed alone.
    ds.context.execution_options.preserve_order = data.deterministic
    return ds


# Arrow-backed arrays are read-only; nothing writes to them (to_device makes a new float tensor).
# Silenced once for the process, this message alone: warnings.catch_warnings in Ray's collate
# threads would swap the process's filters from several threads at once (pipelines.codecs).
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)


class Collate(NumpyBatchCollateFn):
    """Numpy batch -> tensors, no copy; encoded images stay a list of bytes. pin: the images are
    copied into page-locked memory (in Ray's collate threads), from which the copy to the GPU runs
    asynchronously."""

    def __init__(self, pin: bool = False):
        super().__init__()
        self.pin = pin

    def __call__(self, batch: dict) -> dict:
        image = batch["image"]
        if image.dtype != object:
            image = torch.from_numpy(image)
            if self.pin:
                image = image.pin_memory()
        out = {"image": image, "label": torch.from_numpy(batch["label"]), "key": list(batch["key"])}
        if "idx" in batch:
            out["idx"] = np.asarray(batch["idx"], np.int64)  # stays on the host: what a checkpoint records
        return out


def usable_rows(batch: dict, keep_one: bool = False) -> tuple[dict, int]:
    """(the batch without the placeholders of undecodable rows, how many there were), on the host,
    before anything reaches the device or the model's BatchNorm. keep_one: a batch of nothing but
    placeholders keeps its first (label -1: the loss ignores it), so a DDP worker still steps."""
    bad = batch["label"] < 0
    n = int(bad.sum())
    if not n:
        return batch, 0
    keep = ~bad
    if keep_one and not keep.any():
        keep[0] = True
    return {"image": batch["image"][keep], "label": batch["label"][keep],
            "key": [k for k, ok in zip(batch["key"], keep.tolist()) if ok]}, n


def epoch_batches(source, data: DataSection, epoch: int, seed: int, batch_size: int, train: bool,
                  pin: bool = False):
    """One epoch of batches on the host from a Dataset or a Train worker's DataIterator.

    Training batches are shuffled within a local buffer, seeded by (seed, epoch); the file order
    is reshuffled per epoch by read_shards. The final partial training batch is dropped.
    """
    return source.iter_torch_batches(
        # device="cpu": pipelines.feed moves each batch to the GPU on a stream of its own. Ray's
        # "auto" would copy a batch of tensors alone to the worker's GPU on its own thread and stream.
        batch_size=batch_size, collate_fn=Collate(pin), drop_last=train, device="cpu",
        prefetch_batches=data.prefetch_batches,
        local_shuffle_buffer_size=data.shuffle_buffer if train and data.shuffle_buffer else None,
        local_shuffle_seed=(seed * 100_003 + epoch) % 2**32 if train else None)  # numpy takes 32 bits


@functools.lru_cache(maxsize=8)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std on the device, made once rather than copied every batch."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


def to_device(batch: dict, device: torch.device, data: DataSection, channels_last: bool,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC on the host -> normalised float NCHW on the device (NHWC memory = channels_last)."""
    x = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean, std = _channel_stats(data.mean, data.std, device)
    x = (x - mean) / std
    if data.pca_lighting and generator is not None:
        x = lighting(x, data, generator)
    if not channels_last:
        x = x.contiguous()
    return x, batch["label"].to(device, non_blocking=True)


def lighting(x: torch.Tensor, data: DataSection, generator: torch.Generator) -> torch.Tensor:
    """AlexNet-style colour noise on a normalised batch, per image, drawn from generator (CPU)."""
    alpha = torch.randn(x.size(0), 3, generator=generator) * data.pca_lighting
    rgb = (PCA_EIGVEC @ (alpha * PCA_EIGVAL).T).T.to(x.device, non_blocking=True)
    std = _channel_stats(data.mean, data.std, x.device)[1]
    return x + (rgb / std.view(1, 3)).view(-1, 3, 1, 1)
