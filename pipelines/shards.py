"""Image datasets -> Parquet shards:  python -m pipelines.shards --source SOURCE --root PATH --out DIR

The first stage (shards -> data -> train), and the reading side of its format (load_manifest,
check_shards). Output:
    DIR/train/part-00000.parquet ...   columns image (encoded bytes), label, class_id, key, height, width
    DIR/val/part-00000.parquet ...
    DIR/manifest.json                  classes, rows and SHA-256 per shard, options, every skipped file

DIR may be an s3:// (or gs://) URI: fs_and_path, the one place filesystems are built, says where
the endpoint and credentials come from.

Nothing is lost or corrupted: each shard is written under a temporary name and renamed when
complete (in an object store it appears when its upload completes); a rerun after a kill writes
only the missing shards, and the result is byte-identical to an uninterrupted run. Unreadable files
are skipped and listed with their reason; they never stop a run.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import re
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipelines.errors import cli_errors

FORMAT = "ray-resnet-shards/1"
SPLITS = ("train", "val")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("class_id", pa.string()),
                    ("key", pa.string()), ("height", pa.int32()), ("width", pa.int32())])


class ShardError(ValueError):
    """A source or shard directory that cannot be used; the message names the file at fault."""


@dataclass(frozen=True)
class Options:
    """Everything that decides the output bytes (so a resume must use the same)."""
    rows_per_shard: int | None = None   # None: chosen from shard_mb and a sample's encoded size
    shard_mb: float = 192.0
    max_side: int | None = None         # re-encode images whose long side exceeds this
    quality: int = 90                   # JPEG quality of re-encoded images
    seed: int = 0
    max_pixels: int = 64_000_000        # refuse larger images before decoding (decompression bombs)


@dataclass(slots=True)  # ImageNet plans hold 1.3M of these
class Item:
    key: str                            # path relative to the root, or an id
    label: int
    pixels: np.ndarray | None = field(default=None, repr=False)  # in-memory sources: HxWx3 uint8


@dataclass
class Source:
    kind: str
    root: str | None
    classes: list[tuple[str, str]]      # (class_id, human-readable name), in label order
    splits: dict[str, list[Item]]
    ignored: list[dict]                 # files that are not images: {"key", "reason"}
    details: dict                       # where labels came from, split fractions, ...


# ---------------------------------------------------------------------------------------------
# Sources: each lists its images and labels; nothing is decoded here.

def _listing(directory: Path, root: Path, ignored: list) -> list[str]:
    """Image files under directory (recursively), as keys relative to root; others go to ignored."""
    keys, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):  # symlinked class folders
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            key = os.path.relpath(os.path.join(dirpath, name), root)
            if name.startswith("."):
                ignored.append({"key": key, "reason": "hidden file"})
            elif os.path.splitext(name)[1].lower() not in IMAGE_EXTS:
                ignored.append({"key": key, "reason": "not an image file"})
            else:
                keys.append(key)
    return keys


def _in_class_dirs(directory: Path, root: Path, ignored: list) -> list[str]:
    """Image keys inside directory/<class>/; images lying loose in directory are ignored."""
    depth = len(directory.relative_to(root).parts) + 1
    keys = []
    for k in _listing(directory, root, ignored):
        if len(Path(k).parts) > depth:
            keys.append(k)
        else:
            ignored.append({"key": k, "reason": "not in a class folder"})
    return keys


def _class_dirs(directory: Path) -> list[str]:
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _find(root: Path, name: str) -> Path | None:
    """name in root or up to three levels above it (Kaggle keeps its CSVs beside ILSVRC/Data/CLS-LOC)."""
    for d in [root, *list(root.parents)[:3]]:
        if (d / name).is_file():
            return d / name
    return None


def scan_imagenet(root: Path, val_labels: Path | None = None, devkit: Path | None = None) -> Source:
    """ILSVRC2012: train/<wnid>/*.JPEG; val flat with LOC_val_solution.csv or the devkit, or sorted."""
    if not (root / "train").is_dir():
        what = "no train/ folder" if root.is_dir() else "not a folder" if root.exists() else "no such folder"
        raise ShardError(f"{root}: {what}; --source imagenet expects ROOT/train/<wnid>/*.JPEG "
                         "and ROOT/val/ (flat with LOC_val_solution.csv or the devkit, or val/<wnid>/)")
    ignored: list = []
    wnids = _class_dirs(root / "train")
    index = {w: i for i, w in enumerate(wnids)}
    train = [Item(k, index[Path(k).parts[1]]) for k in _in_class_dirs(root / "train", root, ignored)]
    names = dict.fromkeys(wnids, "")
    mapping = _find(root, "LOC_synset_mapping.txt")
    if mapping:
        for line in mapping.read_text().splitlines():
            wnid, _, words = line.partition(" ")
            if wnid in names:
                names[wnid] = words.strip()
    details: dict = {"names": str(mapping) if mapping else None}

    val: list[Item] = []
    vdir = root / "val"
    if vdir.is_dir():
        val_keys = _listing(vdir, root, ignored)
        if _class_dirs(vdir):  # already sorted into val/<wnid>/
            details["val_labels"] = "val/<wnid>/ folders"
            labels = {k: Path(k).parts[1] for k in val_keys}
        else:
            labels, details["val_labels"] = _flat_val_labels(root, val_labels, devkit, names)
        for k in val_keys:
            wnid = labels.get(k) or labels.get(Path(k).stem)
            if wnid is None:
                raise ShardError(f"{root / k}: no label for this validation image in {details['val_labels']}")
            if wnid not in index:
                raise ShardError(f"{root / k}: labelled {wnid} in {details['val_labels']}, "
                                 "which is not a class in train/")
            val.append(Item(k, index[wnid]))
    return Source("imagenet", str(root), [(w, names[w]) for w in wnids],
                  {"train": train, "val": val}, ignored, details)


def _flat_val_labels(root: Path, csv: Path | None, devkit: Path | None, names: dict) -> tuple[dict, str]:
    """{image stem: wnid} from the Kaggle CSV or the devkit's ground truth + meta.mat."""
    csv = csv or _find(root, "LOC_val_solution.csv")
    if csv and csv.suffix == ".csv":
        labels = {}
        for n, line in enumerate(csv.read_text().splitlines()[1:], start=2):
            image_id, _, prediction = line.partition(",")
            if not prediction.strip():
                raise ShardError(f"{csv}, row {n}: expected ImageId,PredictionString with a wnid first")
            labels[image_id.strip()] = prediction.split()[0]
        return labels, str(csv)
    gt_name, meta_name = "ILSVRC2012_validation_ground_truth.txt", "meta.mat"
    gt = (devkit / "data" / gt_name) if devkit else (csv or _find(root, gt_name))
    meta = (devkit / "data" / meta_name) if devkit else _find(root, meta_name)
    if gt is None or not gt.is_file() or meta is None or not meta.is_file():
        raise ShardError(f"{root / 'val'}: flat validation images need labels: LOC_val_solution.csv "
                         f"(Kaggle), or {gt_name} with {meta_name} (devkit; --devkit DIR), or val/<wnid>/ folders")
    from scipy.io import loadmat
    synsets = loadmat(meta, squeeze_me=True)["synsets"]
    by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    for s in synsets:
        if str(s["WNID"]) in names and not names[str(s["WNID"])]:
            names[str(s["WNID"])] = str(s["words"])
    ids = [int(x) for x in gt.read_text().split()]
    # The devkit lists labels in the order of the sorted file names ILSVRC2012_val_00000001 ...
    return {f"ILSVRC2012_val_{i:08d}": by_id[label] for i, label in enumerate(ids, 1)}, f"{gt} + {meta}"


def _stratified_split(items: list[Item], val_fraction: float, seed: int) -> tuple[list, list]:
    from sklearn.model_selection import train_test_split
    items = sorted(items, key=lambda i: i.key)
    try:
        return train_test_split(items, test_size=val_fraction, random_state=seed,
                                stratify=[i.label for i in items])
    except ValueError as e:  # a class with one image, or fewer val slots than classes
        counts = Counter(i.label for i in items)
        raise ShardError(f"cannot split {len(items)} images in {len(counts)} classes (smallest class: "
                         f"{min(counts.values(), default=0)}) with val_fraction={val_fraction} ({e}); "
                         "give every class at least 2 images and the val split one per class") from None


def scan_folder(root: Path, val_fraction: float, seed: int) -> Source:
    """root/<class>/<images>, or root/train/<class>/ and root/val/<class>/."""
    if not root.is_dir():
        raise ShardError(f"{root}: no such folder; --source folder expects ROOT/<class>/<images>")
    ignored: list = []
    presplit = (root / "train").is_dir()
    if presplit and not (root / "val").is_dir():
        raise ShardError(f"{root}: has train/ but no val/; give both, or put the class folders "
                         "directly under ROOT for a seeded split (--val-fraction)")
    if presplit:
        ignored += [{"key": d, "reason": "not train/ or val/"} for d in _class_dirs(root)
                    if d not in SPLITS]
    classes = _class_dirs(root / "train") if presplit else _class_dirs(root)
    if not classes:
        raise ShardError(f"{root}: no class folders; --source folder expects ROOT/<class>/<images>")
    index = {c: i for i, c in enumerate(classes)}
    if presplit:
        splits = {}
        for split in SPLITS:
            items = []
            for k in _in_class_dirs(root / split, root, ignored):
                cls = Path(k).parts[1]
                if cls not in index:
                    raise ShardError(f"{root / k}: class {cls} is not in {root / 'train'}")
                items.append(Item(k, index[cls]))
            splits[split] = items
        details = {"split": "train/ and val/ folders"}
    else:
        items = [Item(k, index[Path(k).parts[0]]) for k in _in_class_dirs(root, root, ignored)]
        train, val = _stratified_split(items, val_fraction, seed)
        splits, details = {"train": train, "val": val}, {"split": f"stratified, val_fraction={val_fraction}"}
    return Source("folder", str(root), [(c, c) for c in classes], splits, ignored, details)


def load_cifar10(root: Path) -> Source:
    """cifar-10-python.tar.gz, or the extracted cifar-10-batches-py/ folder."""
    def unpickle(raw: bytes, where: str) -> dict:
        try:
            return pickle.loads(raw, encoding="bytes")
        except Exception as e:
            raise ShardError(f"{where}: not a CIFAR-10 python batch ({e})") from None

    expects = "--source cifar10 expects cifar-10-python.tar.gz or its cifar-10-batches-py/ folder"
    if not root.exists():
        raise ShardError(f"{root}: no such file or folder; {expects}")
    batches: dict[str, dict] = {}
    if root.is_file():
        try:
            with tarfile.open(root) as tar:
                for m in tar.getmembers():
                    if m.isfile() and Path(m.name).name in {*(f"data_batch_{i}" for i in range(1, 6)),
                                                            "test_batch", "batches.meta"}:
                        batches[Path(m.name).name] = unpickle(tar.extractfile(m).read(), f"{root}:{m.name}")
        except (tarfile.TarError, EOFError, OSError):  # not an archive, or a cut one
            raise ShardError(f"{root}: not a tar archive that can be read whole; {expects}") from None
    elif root.is_dir():
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        for p in base.iterdir():
            if p.name.startswith(("data_batch_", "test_batch", "batches.meta")):
                batches[p.name] = unpickle(p.read_bytes(), str(p))
    missing = [n for n in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
               if n not in batches]
    if missing:
        raise ShardError(f"{root}: missing {', '.join(missing)}; {expects}")
    names = [n.decode() for n in batches["batches.meta"][b"label_names"]]
    splits: dict[str, list[Item]] = {"train": [], "val": []}
    for name in sorted(batches):
        if name == "batches.meta":
            continue
        b = batches[name]
        pixels = np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        files = [f.decode() for f in b.get(b"filenames", [])] or [f"{i:05d}" for i in range(len(pixels))]
        split = "val" if name == "test_batch" else "train"
        splits[split] += [Item(f"{name}/{f}", int(label), px)
                          for f, label, px in zip(files, b[b"labels"], pixels)]
    return Source("cifar10", str(root), [(n, n) for n in names], splits, [], {"val": "test_batch"})


def load_digits_source(image_size: int, seed: int, val_fraction: float = 0.2) -> Source:
    """scikit-learn's bundled 1,797 real 8x8 digits, upscaled to image_size, stratified 80/20 split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    items = []
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        small = Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8), mode="L")
        big = small.resize((image_size, image_size), Image.BILINEAR).convert("RGB")
        items.append(Item(f"digits/{i:04d}", int(label), np.asarray(big)))
    train, val = _stratified_split(items, val_fraction, seed)
    return Source("digits", None, [(str(c), str(c)) for c in d.target_names],
                  {"train": train, "val": val}, [],
                  {"image_size": image_size, "split": f"stratified, val_fraction={val_fraction}"})


# ---------------------------------------------------------------------------------------------
# Encoding: one image -> (bytes, height, width), or the reason it was skipped.

def encode(item: Item, root: str | None, opts: Options) -> tuple[bytes, int, int] | str:
    if item.pixels is not None:  # in-memory sources are stored losslessly
        img = Image.fromarray(item.pixels)
        return _save(img, "PNG", opts), img.height, img.width
    try:
        with open(os.path.join(root, item.key), "rb") as f:
            data = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size  # from the header: nothing is decoded yet
            if w * h > opts.max_pixels:
                return f"too large: {w}x{h} pixels, over --max-pixels {opts.max_pixels}"
            img.load()       # a full decode: truncated or corrupt data fails here, not in training
            rotated = img.getexif().get(0x0112, 1) not in (0, 1)
            small = opts.max_side is None or max(w, h) <= opts.max_side
            if img.format == "JPEG" and img.mode == "RGB" and not rotated and small:
                return data, h, w  # the original bytes, untouched
            out = ImageOps.exif_transpose(img).convert("RGB")  # CMYK, grayscale, palette, PNG ...
            if not small:
                scale = opts.max_side / max(out.size)
                out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))),
                                 Image.LANCZOS)
            return _save(out, "JPEG", opts), out.height, out.width
    except Image.DecompressionBombError as e:
        return f"too large: {e}"
    except Image.UnidentifiedImageError:
        return "cannot decode: not a recognised image format"
    except Exception as e:  # PIL raises many types for bad data; a bad file must not stop the run
        text = re.sub(r" at 0x[0-9a-f]+", "", str(e))  # reasons must be the same in every run
        return "truncated" if "truncated" in text else f"cannot decode: {type(e).__name__}: {text}"


def _save(img: Image.Image, fmt: str, opts: Options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": opts.quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Writing: a deterministic plan of shards; each written atomically; a manifest at the end.

def plan(source: Source, opts: Options) -> dict[str, list[list[Item]]]:
    """Shards per split: items sorted by key, shuffled by the seed, cut into equal runs of rows."""
    rows = opts.rows_per_shard or _rows_for_size(source, opts)
    shards = {}
    for split in SPLITS:
        items = sorted(source.splits.get(split, []), key=lambda i: i.key)
        random.Random(f"{opts.seed}/{split}").shuffle(items)
        shards[split] = [items[i:i + rows] for i in range(0, len(items), rows)]
    return shards


def _rows_for_size(source: Source, opts: Options) -> int:
    """Rows per shard for about shard_mb, from the encoded size of a seeded sample of 64 images."""
    items = sorted(source.splits["train"] or source.splits["val"], key=lambda i: i.key)
    sample = random.Random(opts.seed).sample(items, min(64, len(items)))
    sizes = [len(r[0]) for r in (encode(i, source.root, opts) for i in sample) if not isinstance(r, str)]
    return max(1, int(opts.shard_mb * 2**20 / (sum(sizes) / len(sizes)))) if sizes else 1024


def _write_shard(out: str, split: str, index: int, items: list[Item], root: str | None,
                 class_ids: list[str], opts: Options) -> dict:
    rows, skipped = {name: [] for name in SCHEMA.names}, []
    for item in items:
        result = encode(item, root, opts)
        if isinstance(result, str):
            skipped.append({"split": split, "key": item.key, "reason": result})
            continue
        data, h, w = result
        for name, value in zip(SCHEMA.names, (data, item.label, class_ids[item.label],
                                             item.key, h, w)):
            rows[name].append(value)
    n = len(rows["key"])
    table, rows = pa.table(rows, schema=SCHEMA), None  # one copy of the images at a time
    sink = pa.BufferOutputStream()
    # JPEGs do not compress; a CRC per page lets every read find flipped bytes (pipelines.data)
    pq.write_table(table, sink, compression="none", row_group_size=256, write_page_checksum=True)
    del table
    blob = sink.getvalue()  # an Arrow buffer: hashed and written without another copy
    name = f"{split}/part-{index:05d}.parquet"
    meta = {"file": name, "rows": n, "bytes": blob.size,
            "sha256": hashlib.sha256(blob).hexdigest(), "skipped": skipped}
    store = Output(out)
    store.write(f".progress/{split}-{index:05d}.json", json.dumps(meta).encode())
    store.write(name, blob)  # the shard appears only when whole, after its record
    return meta


class Output:
    """The writer's DIR: a local directory, where each file is written under a temporary name and
    renamed when whole, or an s3:// / gs:// prefix, where an object appears only once its upload
    has completed (a killed upload leaves nothing). Either way a file is there whole or not at all."""

    def __init__(self, out: str):
        self.uri = out.rstrip("/")
        self.fs, self.root = fs_and_path(self.uri)
        self.local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def prepare(self) -> None:
        """Local: the folders, and no temporary files of a killed run (object stores have neither)."""
        if not self.local:
            return
        for d in (".progress", *SPLITS):
            Path(self.root, d).mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            for tmp in Path(self.root, s).glob(".*.tmp-*"):
                tmp.unlink()

    def read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{name}") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        info = self.fs.get_file_info(f"{self.root}/{name}")
        return info.size if info.type == pyarrow.fs.FileType.File else None

    def write(self, name: str, data) -> None:
        if not self.local:
            with self.fs.open_output_stream(f"{self.root}/{name}") as f:
                f.write(data)
            return
        path = Path(self.root, name)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _done(out: Output, split: str, index: int) -> dict | None:
    """The record of a shard finished by an earlier run, if the shard is there in full."""
    try:
        meta = json.loads(out.read(f".progress/{split}-{index:05d}.json") or b"")
        return meta if out.size(meta["file"]) == meta["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def write_shards(source: Source, out: str | os.PathLike, opts: Options = Options(),
                 workers: int = 1, progress=sys.stderr) -> dict:
    """Write (or finish writing) DIR's shards and manifest; returns the manifest. DIR is a local
    path or an s3:// / gs:// URI (fs_and_path says where the credentials come from)."""
    store = Output(str(out))
    out = store.uri
    t0 = time.perf_counter()
    shards = plan(source, opts)
    # What decides the bytes: a resume must match it exactly, labels and class list included.
    identity = {"format": FORMAT, "source": _describe(source), "options": asdict(opts),
                "plan": hashlib.sha256(json.dumps(
                    {"classes": source.classes,
                     **{s: [[(i.key, i.label) for i in shard] for shard in shards[s]] for s in SPLITS}}
                ).encode()).hexdigest()}
    try:
        store.prepare()
        planned = store.read(".progress/plan.json")
    except OSError as e:  # an object store: no such bucket, credentials refused
        raise ShardError(f"{out}: cannot use it ({storage_error(e)}){storage_hint(out)}") from None
    if planned is not None and json.loads(planned) != identity:
        raise ShardError(f"{out}: holds shards written from another source or with other options "
                         f"(see {out}/.progress/plan.json); rerun with the same ones to resume, or use a new --out")
    try:
        store.write(".progress/plan.json", json.dumps(identity, indent=1).encode())
    except OSError as e:
        raise ShardError(f"{out}: cannot write there ({storage_error(e)}){storage_hint(out)}") from None

    metas = {s: [_done(store, s, i) for i in range(len(shards[s]))] for s in SPLITS}
    todo = [(s, i) for s in SPLITS for i, m in enumerate(metas[s]) if m is None]
    total = sum(len(shard) for s in SPLITS for shard in shards[s])
    bar = _Progress(total, sum(len(shards[s][i]) for s in SPLITS for i, m in enumerate(metas[s]) if m),
                    progress)
    class_ids = [c for c, _ in source.classes]
    if workers <= 1:
        for s, i in todo:
            metas[s][i] = _write_shard(str(out), s, i, shards[s][i], source.root, class_ids, opts)
            bar.advance(len(shards[s][i]))
    else:  # one task per shard: each carries only its own items
        # pyarrow's S3 client (the AWS SDK) does not survive a fork once started: spawned processes there
        pool = ProcessPoolExecutor(workers, initializer=die_with_parent,
                                   mp_context=None if store.local else multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(_write_shard, str(out), s, i, shards[s][i], source.root,
                                   class_ids, opts): (s, i) for s, i in todo}
            for fut in as_completed(futures):
                s, i = futures[fut]
                metas[s][i] = fut.result()
                bar.advance(len(shards[s][i]))
        finally:  # on an error or Ctrl-C, stop now rather than after every queued shard
            pool.shutdown(cancel_futures=True)
    bar.close()

    manifest = {
        "format": FORMAT, "source": _describe(source), "options": asdict(opts),
        "classes": [{"index": i, "id": c, "name": n} for i, (c, n) in enumerate(source.classes)],
        "splits": {s: {"rows": sum(m["rows"] for m in metas[s]),
                       "shards": [{k: m[k] for k in ("file", "rows", "bytes", "sha256")} for m in metas[s]]}
                   for s in SPLITS},
        "skipped": [x for s in SPLITS for m in metas[s] for x in m["skipped"]],
        "ignored": source.ignored,
    }
    store.write("manifest.json", json.dumps(manifest, indent=1).encode())  # last: the shards are all there
    written = sum(metas[s][i]["rows"] for s, i in todo)
    manifest_summary(manifest, time.perf_counter() - t0, progress, written)
    return manifest


def die_with_parent() -> None:
    """This process gets SIGTERM when the thread that started it ends, also when that process is
    killed (SIGKILL runs no cleanup): the writer's pool workers, a sweep's MLflow server
    (pipelines.tracking). Linux's PR_SET_PDEATHSIG; elsewhere a no-op."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _describe(source: Source) -> dict:
    return {"kind": source.kind, "root": source.root, **source.details}


class _Progress:
    """Images done, rate and ETA on one line (a line every 10 s when not a terminal)."""

    def __init__(self, total: int, done: int, stream):
        self.total, self.done, self.start_done, self.stream = total, done, done, stream
        self.t0 = self.last = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        tty = getattr(self.stream, "isatty", lambda: False)()
        if self.stream is None or (not tty and now - self.last < 10 and self.done < self.total):
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0
        line = (f"{self.done:,}/{self.total:,} images ({self.done / max(self.total, 1):.0%}), "
                f"{rate:,.0f} img/s, ETA {eta / 60:.1f} min")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.stream is not None and getattr(self.stream, "isatty", lambda: False)():
            print(file=self.stream)


def manifest_summary(manifest: dict, seconds: float, stream, written: int) -> None:
    """The closing lines: the shard set, and how much of it this run wrote (a resumed one: the rest)."""
    if stream is None:
        return
    splits = manifest["splits"]
    rows = sum(s["rows"] for s in splits.values())
    size = sum(sh["bytes"] for s in splits.values() for sh in s["shards"])
    reasons = Counter(x["reason"].split(":")[0] for x in manifest["skipped"])
    per_split = ", ".join(f"{k} {v['rows']:,}" for k, v in splits.items())
    shard_set = (f"{rows:,} images ({per_split}) in {sum(len(s['shards']) for s in splits.values())} shards, "
                 f"{size / 2**20:,.1f} MiB, {len(manifest['classes'])} classes")
    print(f"wrote {shard_set}, {seconds:.1f} s" if written == rows
          else f"{shard_set}, all written before" if not written
          else f"{shard_set}; this run wrote {written:,} of them in {seconds:.1f} s", file=stream)
    print(f"skipped {len(manifest['skipped'])}" + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.items())})"
                                                  if reasons else "")
          + f"; ignored {len(manifest['ignored'])} non-image or hidden files", file=stream)


# ---------------------------------------------------------------------------------------------
# Reading the format back: the manifest and the shards it lists, checked

GCS_RETRY_S = 120  # the default deadline of Google's Python clients (google.api_core.retry)


def fs_and_path(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path) of a local path or an s3:// / gs:// URI: the one place this project
    builds a filesystem, for shards, checkpoints and the files beside them, and Ray Train's storage.

    s3://: pyarrow takes the endpoint, region and credentials from the standard AWS settings
    (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible store, AWS_REGION or
    AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else a
    profile or the machine's role). Keys from this process's environment are put into the
    filesystem itself: Ray's processes that get it (Train's controller and workers, Data's read
    tasks) then use them without having them in their own environment, and no runtime env, which
    Ray shows on its dashboard and logs, ever holds them. Without such keys each process finds its
    own (a node's role).

    gs://: Google's Application Default Credentials. Failed requests are retried for GCS_RETRY_S
    in all (or the URI's ?retry_limit_seconds=N), not the GCS C++ client's 15 minutes, which a
    machine without credentials or network would wait before its error.
    """
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if isinstance(fs, pyarrow.fs.GcsFileSystem):
        _, (options,) = fs.__reduce__()
        if options["retry_time_limit"] is None:
            fs = pyarrow.fs.GcsFileSystem(**{**options, "retry_time_limit": datetime.timedelta(seconds=GCS_RETRY_S)})
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if isinstance(fs, pyarrow.fs.S3FileSystem) and key and secret:
        _, (options,) = fs.__reduce__()  # what pyarrow resolved (endpoint, region, ...): its pickled form
        fs = pyarrow.fs.S3FileSystem(**{**options, "access_key": key, "secret_key": secret,
                                        "session_token": os.environ.get("AWS_SESSION_TOKEN") or None})
    return fs, path


def storage_error(e: Exception) -> str:
    """An OSError of a filesystem in one line, for messages: its first line, without the GCS
    client's error_info={...}, which repeats the message."""
    return str(e).splitlines()[0].split(" error_info={")[0] if str(e) else type(e).__name__


def storage_hint(uri: str) -> str:
    """For an s3:// or gs:// URI, what decides where its requests go and with which credentials
    (an error's tail: '; ...'); nothing for other paths."""
    if uri.startswith("gs://"):  # pyarrow's GcsFileSystem: Google's Application Default Credentials
        return ("; check that the bucket exists and the credentials may use it: GOOGLE_APPLICATION_CREDENTIALS "
                "(a service account's key file) off Google Cloud, else the machine's service account")
    if not uri.startswith("s3://"):
        return ""
    return ("; check that the bucket exists and the credentials may use it: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the machine's role), and AWS_ENDPOINT_URL for an "
            "S3-compatible store")


def load_manifest(shards_dir: str) -> dict:
    fs, root = fs_and_path(shards_dir)
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError as e:
        raise ShardError(f"{shards_dir}/manifest.json: cannot read it ({e}); write the shards with "
                         "python -m pipelines.shards, or finish that run by running it again") from None
    except OSError as e:  # an object store that refused: no such bucket, credentials, endpoint
        raise ShardError(f"{shards_dir}/manifest.json: cannot read it ({storage_error(e)})"
                         f"{storage_hint(shards_dir) or '; check the path and its permissions'}") from None
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
    fs, root = fs_and_path(shards_dir)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=["imagenet", "folder", "cifar10", "digits"])
    p.add_argument("--root", type=Path, help="the dataset on disk (not needed for digits)")
    p.add_argument("--out", required=True,
                   help="the shard directory to write or resume: a path, or an s3:// / gs:// URI")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rows-per-shard", type=int)
    g.add_argument("--shard-mb", type=float, default=Options.shard_mb, help="target shard size (default %(default)s)")
    p.add_argument("--max-side", type=int, help="re-encode images whose long side exceeds this")
    p.add_argument("--quality", type=int, default=Options.quality, help="JPEG quality of re-encoded images")
    p.add_argument("--seed", type=int, default=Options.seed, help="sample order and splits")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="parallel encoding processes (default: the CPUs this process may use)")
    p.add_argument("--max-pixels", type=int, default=Options.max_pixels)
    p.add_argument("--val-fraction", type=float, default=None,
                   help="folder without train/val (default 0.1), digits (default 0.2)")
    p.add_argument("--image-size", type=int, default=32, help="digits: upscaled side")
    p.add_argument("--val-labels", type=Path, help="imagenet: LOC_val_solution.csv or the ground-truth txt")
    p.add_argument("--devkit", type=Path, help="imagenet: ILSVRC2012_devkit_t12 folder")
    a = p.parse_args(argv)
    with cli_errors(ShardError):
        for name, v, lo in (("--rows-per-shard", a.rows_per_shard, 1), ("--max-side", a.max_side, 1),
                            ("--workers", a.workers, 1), ("--image-size", a.image_size, 8)):
            if v is not None and v < lo:
                raise ShardError(f"{name}={v}: must be at least {lo}")
        if not 1 <= a.quality <= 100:
            raise ShardError(f"--quality={a.quality}: a JPEG quality from 1 to 100")
        if a.val_fraction is not None and not 0 < a.val_fraction < 1:
            raise ShardError(f"--val-fraction={a.val_fraction}: a fraction between 0 and 1")
        if a.source != "digits" and a.root is None:
            raise ShardError(f"--source {a.source} needs --root PATH")
        if a.source == "imagenet":
            source = scan_imagenet(a.root.resolve(), a.val_labels, a.devkit)
        elif a.source == "folder":
            source = scan_folder(a.root.resolve(), a.val_fraction or 0.1, a.seed)
        elif a.source == "cifar10":
            source = load_cifar10(a.root.resolve())
        else:
            source = load_digits_source(a.image_size, a.seed, a.val_fraction or 0.2)
        opts = Options(rows_per_shard=a.rows_per_shard, shard_mb=a.shard_mb, max_side=a.max_side,
                       quality=a.quality, seed=a.seed, max_pixels=a.max_pixels)
        write_shards(source, a.out, opts, workers=a.workers)


if __name__ == "__main__":
    main()
