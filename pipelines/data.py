"""Shards -> Ray Data: the input stage between pipelines.shards and pipelines.train.

Reading starts from the manifest: every shard it lists must be there, whole and unaltered, or the
read stops with the shard's name. Nothing is inferred from a directory listing.
"""
from __future__ import annotations

import hashlib
import json

import pyarrow.fs
import pyarrow.parquet as pq

from pipelines.shards import FORMAT, SPLITS, ShardError


def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A local path, or an s3:// / gs:// URI (clusters keep shards on shared storage)."""
    if "://" not in uri:
        import os
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


def read_shards(shards_dir: str, split: str, verify: str = "size"):
    """The split as a streaming Ray Dataset (columns image, label, class_id, key, height, width)."""
    import ray.data
    paths = check_shards(shards_dir, split, verify)
    fs, _ = _fs(shards_dir)
    return ray.data.read_parquet(paths, filesystem=fs)
