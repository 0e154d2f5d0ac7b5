"""Shards -> Ray Data -> training batches: the input stage between pipelines.shards and pipelines.train.

    train_ds, val_ds, manifest = build_datasets(cfg.data, seed)   # lazy, streaming Ray Datasets
    for batch in epoch_batches(train_ds, cfg.data, epoch, seed, batch_size, train=True):
        x, y = to_device(batch, device, cfg.data, channels_last)  # uint8 NHWC -> normalised float

Reading starts from the manifest: every shard it lists must be there, whole and unaltered, or the
read stops with the shard's name. Images are decoded and augmented in Ray Data `map_batches` tasks
on the CPUs training does not use, and travel as uint8 (a quarter of float32's bytes); the
training device normalises them. The transforms themselves are plain torchvision, testable alone.
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
from ray.data.collate_fn import NumpyBatchCollateFn
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from pipelines.config import HOME, DataSection
from pipelines.shards import FORMAT, SPLITS, ShardError

log = logging.getLogger(__name__)
BLOCK_BYTES = 8 * 2**20
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


def check_shards(shards_dir: str, split: str, verify: str = "size") -> list[str]:
    """Paths of the split's shards, after checking each against the manifest.

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
                rows = pq.ParquetFile(f).metadata.num_rows
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
        paths.append(path)
    return paths


def read_shards(shards_dir: str, split: str, verify: str = "size", shuffle_seed: int | None = None):
    """The split as a streaming Ray Dataset (columns image, label, class_id, key, height, width).

    With shuffle_seed, the shard order is shuffled anew each epoch (each execution), from the seed.
    """
    import ray.data
    paths = check_shards(shards_dir, split, verify)
    fs, _ = _fs(shards_dir)
    shuffle = None if shuffle_seed is None else ray.data.FileShuffleConfig(seed=shuffle_seed)
    return ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle)


# ---------------------------------------------------------------------------------------------
# Transforms: PIL image -> uint8 CHW tensor of one size. No Ray here.

class ShorterSideRandomResize(torch.nn.Module):
    """The paper's scale augmentation: the shorter side resized to a random size in [lo, hi]."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, img):
        size = int(torch.randint(self.lo, self.hi + 1, ()))
        return TF.resize(img, size, antialias=True)


def build_transform(data: DataSection, train: bool) -> T.Compose:
    c = data.crop_size
    if not train:
        steps = ([T.Resize(data.val_resize, antialias=True)] if data.val_resize else []) + [T.CenterCrop(c)]
    elif data.train_transform == "paper":
        steps = [ShorterSideRandomResize(*data.scale_range), T.RandomCrop(c, pad_if_needed=True)]
    elif data.train_transform == "rrc":
        steps = [T.RandomResizedCrop(c, scale=tuple(data.rrc_scale), antialias=True)]
    else:  # cifar: 4-pixel zero padding, random crop, flip (paper section 4.2)
        steps = [T.RandomCrop(c, padding=4)]
    if train and data.flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.PILToTensor()])


def draft_side(data: DataSection, train: bool) -> int | None:
    """The smallest shorter side a JPEG may be decoded at without losing pixels the transform uses."""
    if not train:
        return data.val_resize
    return data.scale_range[1] if data.train_transform == "paper" else None


def decode(data: bytes, min_side: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB image; a large JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT domain
    (PIL's draft) when its shorter side stays at least min_side."""
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        scale = min_side / min(img.size)
        if scale < 0.5:
            img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
    return img.convert("RGB")


class DecodeAugment:
    """map_batches: encoded rows -> {"image": uint8 N x H x W x 3, "label", "key"}.

    A row that fails to decode is logged with its key and dropped (data.bad_records=skip), or
    stops the run naming it (fail). The epoch's count of dropped rows is the manifest's rows minus
    the rows seen, which the training loop reports.
    """

    def __init__(self, data: DataSection, train: bool):
        self.data, self.train = data, train
        self.transform, self.min_side = build_transform(data, train), draft_side(data, train)

    def __call__(self, batch: dict) -> dict:
        if self.train:  # torch's global RNG starts equal in every process: draw fresh per batch
            torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        images, labels, keys = [], [], []
        for data, label, key in zip(batch["image"], batch["label"], batch["key"]):
            try:
                images.append(self.transform(decode(data, self.min_side)).permute(1, 2, 0).numpy())
            except Exception as e:
                if self.data.bad_records == "fail":
                    raise ShardError(f"{key}: cannot decode ({type(e).__name__}: {e}); "
                                     "set data.bad_records=skip to skip such records") from e
                log.warning("skipping %s: cannot decode (%s: %s)", key, type(e).__name__, e)
                continue
            labels.append(label)
            keys.append(key)
        c = self.data.crop_size
        return {"image": np.stack(images) if images else np.zeros((0, c, c, 3), np.uint8),
                "label": np.asarray(labels, dtype=np.int64), "key": np.asarray(keys, dtype=object)}


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
        ds = read_shards(directory, split, shuffle_seed=seed if train else None)
        ds = ds.select_columns(["image", "label", "key"])
        ds = ds.map_batches(DecodeAugment(data, train), batch_size=data.decode_batch, num_cpus=1)
        # Decoded images are ~150 KB each at 224x224: small output blocks let Ray Data's
        # backpressure keep the object store from filling (and spilling) between producer and consumer.
        ds.context.target_max_block_size = BLOCK_BYTES
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
