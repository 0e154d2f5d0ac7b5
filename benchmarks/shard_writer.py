"""Shard writer speed on ImageNet-like JPEGs:  python benchmarks/shard_writer.py [--images N]

The images are real photographs (benchmarks/photos.py: windows of scikit-learn's two bundled
photos rescaled to ImageNet's typical 500x375, JPEG quality 90). The baseline is
the least a safe writer must do, measured in the same run: read each file and decode it fully
with PIL in one process. The writer's rate per core is printed with its ratio to that baseline.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from photos import make_photos
from pipelines.shards import Options, scan_folder, write_shards


def decode_baseline(root: Path) -> float:
    files = sorted(root.rglob("*.JPEG"))
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            img.load()
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--max-side", type=int, nargs="*", default=[256, 480])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        size = make_photos(root, a.images)
        print(f"{a.images} JPEGs, mean {size / a.images / 1024:.0f} KiB, {os.cpu_count()} cores")
        baseline = decode_baseline(root)
        print(f"{'mode':<28} {'img/s/core':>10} {'vs decode':>9} {'KiB/img':>8}")
        print(f"{'baseline: PIL read+decode':<28} {baseline:>10.0f} {1.0:>9.2f} {size / a.images / 1024:>8.0f}")
        source = scan_folder(root, 0.1, 0)
        runs = [("writer, 1 worker", None, 1)] + [(f"writer --max-side {m}", m, 1) for m in a.max_side]
        if a.workers > 1:
            runs.append((f"writer, {a.workers} workers", None, a.workers))
        for i, (name, max_side, workers) in enumerate(runs):
            out = Path(tmp) / f"shards{i}"
            t0 = time.perf_counter()
            m = write_shards(source, out, Options(rows_per_shard=100, max_side=max_side), workers=workers,
                             progress=None)
            rate = a.images / (time.perf_counter() - t0) / workers
            stored = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"])
            print(f"{name:<28} {rate:>10.0f} {rate / baseline:>9.2f} {stored / a.images / 1024:>8.0f}")


if __name__ == "__main__":
    main()
