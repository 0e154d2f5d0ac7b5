"""Shards -> Ray Data -> training batches: the input stage between pipelines.shards and pipelines.train.

    train_ds, val_ds, manifest = build_datasets(cfg.data, seed)   # lazy, streaming Ray Datasets
    for batch in epoch_batches(train_ds, cfg.data, epoch, seed, batch_size, train=True):
        x, y = to_device(batch, device, cfg.data, channels_last)  # uint8 NHWC -> normalised float

Reading starts from the manifest: every shard it lists must be there, whole and unaltered, or the
read stops with the shard's name. Images are decoded and augmented in Ray Data `map_batches` tasks
on the CPUs training does not use, and travel as uint8 (a quarter of float32's bytes); the
training device normalises them. The transforms are torchvision's (applied per image without
T.Compose's per-call machinery), testable alone.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import warnings

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import torch
from PIL import Image
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data._internal.execution.resource_manager import ResourceManager
from ray.data.datasource import Datasource, ReadTask
from torchcodec.decoders import decode_image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from pipelines.config import HOME, DataSection
from pipelines.shards import FORMAT, SPLITS, ShardError

log = logging.getLogger(__name__)

# Ray 2.60's streaming executor starts every execution (every epoch) seeing a cluster with no CPUs:
# its first look comes back empty while Ray's autoscaling coordinator answers asynchronously, and it
# keeps that answer for GLOBAL_LIMITS_UPDATE_INTERVAL_S (1 s), running one task at a time meanwhile,
# however large the cluster. Looking again after 0.1 s took a 6,083-image epoch on 2 CPUs from
# 6.4-6.7 s to 5.7-5.9 s. Set on import: the process that runs a dataset (the driver, or Ray Train's
# split coordinator) imports this module to unpickle DecodeAugment.
if getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > 0.1:
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 0.1

# Rows per read task (whole Parquet row groups of one shard). Ray Data left a CPU idle for about
# 0.2 s between one task and the next, so tasks of one 256-row group (0.3 s of decoding) lost a
# third of the time; much longer ones leave a long tail at the end of each epoch.
ROWS_PER_TASK = 1024
# AlexNet / fb.resnet.torch PCA lighting: eigenvalues and eigenvectors of ImageNet's RGB covariance
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A local path, or an s3:// / gs:// URI (clusters keep shards on shared storage)."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return pyarrow.fs.FileSystem.from_uri(uri)


def load_manifest(shards_dir: str) -> dict:
    fs, root = _fs(shards_dir)
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError) as e:
        raise ShardError(f"{shards_dir}/manifest.json: cannot read it ({e}); write the shards with "
                         "python -m pipelines.shards, or finish that run by running it again") from None
    except ValueError as e:
        raise ShardError(f"{shards_dir}/manifest.json: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{shards_dir}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_shards(shards_dir: str, split: str, verify: str = "size") -> list[tuple[str, int, list[int]]]:
    """(path, bytes, rows of each Parquet row group) of the split's shards, after checking each
    against the manifest.

    verify="size": present, the recorded size, the recorded rows in its Parquet footer (cheap:
    catches missing and truncated shards). verify="sha256": also the checksum (reads every byte).
    """
    if split not in SPLITS:
        raise ShardError(f"split={split!r}: one of {', '.join(SPLITS)}")
    if verify not in ("size", "sha256"):
        raise ShardError(f"verify={verify!r}: 'size' or 'sha256'")
    manifest = load_manifest(shards_dir)
    fs, root = _fs(shards_dir)
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        path = f"{root}/{shard['file']}"
        where = f"{shards_dir.rstrip('/')}/{shard['file']}"
        info = fs.get_file_info(path)
        if info.type != pyarrow.fs.FileType.File:
            raise ShardError(f"{where}: missing (the manifest lists {shard['rows']} rows in it)")
        if info.size != shard["bytes"]:
            raise ShardError(f"{where}: {info.size:,} bytes, the manifest records {shard['bytes']:,} "
                             "(truncated or replaced); rewrite the shards")
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            rows, groups = meta.num_rows, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        except Exception as e:
            raise ShardError(f"{where}: not a readable Parquet file ({e})") from None
        if rows != shard["rows"]:
            raise ShardError(f"{where}: {rows} rows, the manifest records {shard['rows']}")
        if verify == "sha256":
            digest = hashlib.sha256()
            with fs.open_input_stream(path) as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                raise ShardError(f"{where}: SHA-256 differs from the manifest's (altered); rewrite the shards")
        paths.append((path, info.size, groups))
    return paths


class ShardSource(Datasource):
    """The checked shards as Ray Data read tasks: runs of a shard's Parquet row groups (256 images
    each) of up to ROWS_PER_TASK rows.

    Why not read_parquet: Ray 2.60's lists the files and reads their footers through 32 new actors
    at the start of every epoch (0.5-1 s on a laptop, before the first image); check_shards has
    read the footers once already. With a seed, the tasks come in a new order each execution (each
    epoch), drawn from the seed and Ray's count of the dataset's executions (what Ray's own
    FileShuffleConfig uses).
    """

    def __init__(self, shards: list[tuple[str, int, list[int]]], fs, columns: list[str] | None, seed: int | None):
        self.units = []  # (path, row groups, rows): consecutive row groups of a shard, up to ROWS_PER_TASK rows
        for path, _, groups in shards:
            start, rows = 0, 0
            for i, n in enumerate(groups):
                rows += n
                if rows >= ROWS_PER_TASK or i == len(groups) - 1:
                    self.units.append((path, list(range(start, i + 1)), rows))
                    start, rows = i + 1, 0
        self.fs, self.columns, self.seed = fs, columns, seed
        self.bytes, self.rows = sum(size for _, size, _ in shards), sum(n for _, _, n in self.units)

    def estimate_inmemory_data_size(self) -> int:
        return self.bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        order = range(len(self.units))
        if self.seed is not None:
            execution = getattr(data_context, "_execution_idx", 0)
            order = np.random.default_rng([self.seed, execution]).permutation(len(self.units))
        tasks = []
        for k in order:
            path, groups, n = self.units[k]
            meta = BlockMetadata(num_rows=n, size_bytes=self.bytes * n // max(self.rows, 1), input_files=[path],
                                 exec_stats=None)
            tasks.append(ReadTask(functools.partial(_read_row_groups, self.fs, path, groups, self.columns), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _read_row_groups(fs, path: str, groups: list[int], columns: list[str] | None):
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        for g in groups:
            yield pf.read_row_group(g, columns=columns)


def read_shards(shards_dir: str, split: str, verify: str = "size", shuffle_seed: int | None = None,
                columns: list[str] | None = None):
    """The split as a streaming Ray Dataset (columns image, label, class_id, key, height, width, or
    those given).

    With shuffle_seed, the order of the read tasks (runs of row groups) is shuffled anew each epoch
    (each execution), from the seed.
    """
    import ray.data
    shards = check_shards(shards_dir, split, verify)
    fs, _ = _fs(shards_dir)
    source = ShardSource(shards, fs, columns, shuffle_seed)
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

    TorchCodec's libjpeg-turbo/libpng/libwebp decoders, and tensor transforms after them, ran at 1.6x
    PIL's rate for decode + RandomResizedCrop(224) on 500x375 photos, with the same pixels as PIL.
    A JPEG whose shorter side may halve or more without going under min_side is decoded at 1/2, 1/4
    or 1/8 scale in the DCT domain instead (PIL's draft); formats TorchCodec does not read go
    through PIL.
    """
    if min_side and data[:3] == b"\xff\xd8\xff":
        img = Image.open(io.BytesIO(data))
        scale = min_side / min(img.size)
        if scale < 0.5:
            img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            return TF.pil_to_tensor(img.convert("RGB"))
    try:
        return decode_image(data)
    except (RuntimeError, ValueError):  # another format, or damaged: PIL reads more, and says why it cannot
        return TF.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


class DecodeAugment:
    """map_batches over whole read blocks (row groups): encoded rows -> decode_batch rows at a time
    of {"image": uint8 N x H x W x 3, "label", "key"}.

    Taking whole blocks lets Ray fuse the read and the decode into one task (a batch_size would
    keep them apart, with every encoded row passing through the object store in between).
    A row that fails to decode is logged with its key and dropped (data.bad_records=skip), or
    stops the run naming it (fail). The epoch's count of dropped rows is the manifest's rows minus
    the rows seen, which the training loop reports.
    """

    def __init__(self, data: DataSection, train: bool):
        self.data, self.train = data, train
        self.transform, self.min_side = build_transform(data, train), draft_side(data, train)

    def __call__(self, block: dict):
        step = self.data.decode_batch
        for i in range(0, len(block["key"]), step):
            yield self.decode_rows({k: block[k][i:i + step] for k in ("image", "label", "key")})

    def decode_rows(self, batch: dict) -> dict:
        if self.train:  # torch's global RNG starts equal in every process: draw fresh per batch
            torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        images, labels, keys = [], [], []
        for data, label, key in zip(batch["image"], batch["label"], batch["key"]):
            try:
                images.append(self.transform(decode(data, self.min_side)).permute(1, 2, 0))
            except Exception as e:
                if self.data.bad_records == "fail":
                    raise ShardError(f"{key}: cannot decode ({type(e).__name__}: {e}); "
                                     "set data.bad_records=skip to skip such records") from e
                log.warning("skipping %s: cannot decode (%s: %s)", key, type(e).__name__, e)
                continue
            labels.append(label)
            keys.append(key)
        c = self.data.crop_size
        # One C-order array: np.stack of HWC views keeps their strides, and Ray Data's conversion to
        # an Arrow block then spent longer reordering it than decoding. numpy allocates it (in huge
        # pages: torch.empty's page faults cost 0.03 ms an image); torch copies (a CHW crop into
        # HWC at twice numpy's speed).
        out = np.empty((len(images), *(images[0].shape if images else (c, c, 3))), np.uint8)
        for i, image in enumerate(images):
            torch.from_numpy(out[i]).copy_(image)
        return {"image": out, "label": np.asarray(labels, dtype=np.int64), "key": np.asarray(keys, dtype=object)}


# ---------------------------------------------------------------------------------------------
# Datasets and batches

def shards_dir(data: DataSection) -> str:
    """data.shards, or the bundled digits written once to RAY_RESNET_HOME/shards/digits."""
    if data.shards:
        return data.shards
    path = HOME / "shards" / "digits"
    if not (path / "manifest.json").exists():
        from pipelines.shards import Options, load_digits_source, write_shards
        write_shards(load_digits_source(32, seed=0), path, Options(rows_per_shard=512), progress=None)
    return str(path)


def build_datasets(data: DataSection, seed: int):
    """(train, val, manifest): lazy Ray Datasets of decoded, augmented uint8 images."""
    directory = shards_dir(data)
    manifest = load_manifest(directory)
    datasets = []
    for split, train in (("train", True), ("val", False)):
        ds = read_shards(directory, split, shuffle_seed=seed if train else None, columns=["image", "label", "key"])
        ds = ds.map_batches(DecodeAugment(data, train), batch_size=None, num_cpus=1)
        # One output block per decode_batch chunk (64 crops of 224x224: 9.6 MB). A larger limit
        # merges chunks into blocks Ray Data's backpressure cannot hold back in a small object
        # store; a smaller one splits each chunk in two, and copies it again.
        ds.context.target_max_block_size = data.decode_batch * data.crop_size ** 2 * 3 + 2**16
        # Tasks finish in any order; keeping the order makes it a function of the seed alone.
        ds.context.execution_options.preserve_order = data.deterministic
        datasets.append(ds)
    return datasets[0], datasets[1], manifest


class Collate(NumpyBatchCollateFn):
    """Numpy batch -> tensors, no copy. Arrow-backed arrays are read-only; nothing writes to them
    (to_device makes a new float tensor), so torch's warning about that is silenced here."""

    def __call__(self, batch: dict) -> dict:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {"image": torch.from_numpy(batch["image"]), "label": torch.from_numpy(batch["label"]),
                    "key": list(batch["key"])}


def epoch_batches(source, data: DataSection, epoch: int, seed: int, batch_size: int, train: bool):
    """One epoch of batches from a Dataset or a Train worker's DataIterator.

    Training batches are shuffled within a local buffer, seeded by (seed, epoch); the file order
    is reshuffled per epoch by read_shards. The final partial training batch is dropped.
    """
    return source.iter_torch_batches(
        batch_size=batch_size, collate_fn=Collate(), drop_last=train,
        prefetch_batches=data.prefetch_batches,
        local_shuffle_buffer_size=data.shuffle_buffer if train and data.shuffle_buffer else None,
        local_shuffle_seed=(seed * 100_003 + epoch) if train else None)


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
    if data.pca_lighting and generator is not None:  # AlexNet-style colour noise, per image
        alpha = torch.randn(x.size(0), 3, generator=generator) * data.pca_lighting
        rgb = (PCA_EIGVEC @ (alpha * PCA_EIGVAL).T).T.to(device)
        x = x + (rgb / std.view(1, 3)).view(-1, 3, 1, 1)
    if not channels_last:
        x = x.contiguous()
    return x, batch["label"].to(device, non_blocking=True)
