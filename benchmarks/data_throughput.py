"""Input throughput, this pipeline against torch's DataLoader:  python benchmarks/data_throughput.py

Same files, same transforms (RandomResizedCrop(224) + flip, to uint8), same number of CPU workers,
in one run:
  baseline  torchvision ImageFolder + torch.utils.data.DataLoader on the JPEG files (PIL decode)
  baseline  the same DataLoader with this pipeline's decoder (TorchCodec, pipelines.data.decode)
  ours      shards (python -m pipelines.shards) -> Ray Data decode + augment -> batches
  ours      the same from shards written with --max-side
One warm-up epoch each, then the timed epochs (their start-ups included). The last line is
`ratio: X`: ours / the PIL DataLoader on the raw JPEGs. Images: benchmarks/photos.py (real
photographs at ImageNet's typical 500x375, q90).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T

from photos import make_photos
from pipelines.config import load_config
from pipelines.data import build_datasets, build_transform, decode, epoch_batches
from pipelines.shards import Options, scan_folder, write_shards

ROOT = Path(__file__).resolve().parents[1]


def timed(epochs, run_epoch) -> float:
    run_epoch(0)  # warm-up: worker start-up, first reads
    t0, n = time.perf_counter(), 0
    for e in range(1, epochs + 1):
        n += run_epoch(e)
    return n / (time.perf_counter() - t0)


def read_decode(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return decode(f.read())


def dataloader_rate(root: Path, data, workers: int, batch: int, epochs: int, ours: bool = False) -> float:
    if ours:
        folder = ImageFolder(root, transform=build_transform(data, train=True), loader=read_decode)
    else:  # torchvision as its users write it
        folder = ImageFolder(root, transform=T.Compose([
            T.RGB(), T.RandomResizedCrop(data.crop_size, scale=tuple(data.rrc_scale), antialias=True),
            T.RandomHorizontalFlip(), T.PILToTensor()]))
    loader = torch.utils.data.DataLoader(folder, batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=True, prefetch_factor=4)
    return timed(epochs, lambda e: sum(len(y) for _, y in loader))


def ray_rate(shards: Path, data, batch: int, epochs: int) -> float:
    data = data.model_copy(update={"shards": str(shards)})
    train_ds, _, _ = build_datasets(data, seed=0)
    return timed(epochs, lambda e: sum(len(b["label"]) for b in epoch_batches(train_ds, data, e, 0, batch, True)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="CPU workers, both pipelines")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-side", type=int, default=256)
    a = p.parse_args()

    import ray
    import ray.data
    from pipelines.ray_internals import setup_process
    from pipelines.runtime import SETUP_HOOK
    setup_process()  # as the training job's processes are set up
    ray.init(address="local", num_cpus=a.workers, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    data = load_config(ROOT / "ray_config.yaml", ["data.train_transform=rrc", "data.crop_size=224",
                                                   "data.flip=true", "data.shuffle_buffer=1024"]).data
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        size = make_photos(root, a.images)
        source = scan_folder(root, 0.01, 0)
        raw, small = Path(tmp) / "raw", Path(tmp) / "small"
        write_shards(source, raw, Options(), workers=a.workers, progress=None)  # 192 MB shards, as shipped
        m = write_shards(source, small, Options(max_side=a.max_side), workers=a.workers,
                         progress=None)
        small_kib = sum(s["bytes"] for s in m["splits"]["train"]["shards"]) / m["splits"]["train"]["rows"] / 1024
        n_train = m["splits"]["train"]["rows"]
        print(f"{n_train} training JPEGs, mean {size / a.images / 1024:.0f} KiB (max-side {a.max_side}: "
              f"{small_kib:.0f} KiB); RandomResizedCrop(224) + flip; {a.workers} CPU workers; batch {a.batch}; "
              f"{a.epochs} timed epochs after one warm-up")
        # The DataLoader reads the train split's files only, like the shards' train split.
        train_root = Path(tmp) / "train_files"
        for item in source.splits["train"]:
            dst = train_root / item.key
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(root / item.key, dst)
        base = dataloader_rate(train_root, data, a.workers, a.batch, a.epochs)
        base_codec = dataloader_rate(train_root, data, a.workers, a.batch, a.epochs, ours=True)
        ours_raw = ray_rate(raw, data, a.batch, a.epochs)
        ours_small = ray_rate(small, data, a.batch, a.epochs)
    print(f"{'pipeline':<44} {'images/s':>9} {'vs DataLoader':>13}")
    print(f"{'DataLoader + ImageFolder, raw JPEGs':<44} {base:>9.0f} {1.0:>13.2f}")
    print(f"{'  the same, decoded as ours (TorchCodec)':<44} {base_codec:>9.0f} {base_codec / base:>13.2f}")
    print(f"{'Ray Data, shards of the raw JPEGs':<44} {ours_raw:>9.0f} {ours_raw / base:>13.2f}")
    print(f"{f'Ray Data, shards --max-side {a.max_side}':<44} {ours_small:>9.0f} {ours_small / base:>13.2f}")
    print(f"ratio: {ours_raw / base:.2f}")


if __name__ == "__main__":
    main()
