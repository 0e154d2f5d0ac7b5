"""ResNet training throughput on one GPU:  python benchmarks/gpu_throughput.py [--device cuda]

1. The compute ceiling on synthetic data, ResNet-50 at 224x224: fp32; bf16 autocast; bf16 +
   channels_last; + torch.compile; each with foreach and fused SGD where they differ.
2. End to end through the real input path, with the fastest step of (1):
   a. JPEG shards decoded and augmented on CPU workers by Ray Data (pipelines.data), uint8 to the GPU;
   b. the same shards' JPEG bytes decoded on the GPU in batches (torchvision.io.decode_jpeg on
      cuda), RandomResizedCrop + flip on the GPU.
3. Model FLOPs utilisation: 3 x forward FLOPs per image x images/s, against the GPU's dense bf16 peak.
4. ResNet-20 and ResNet-56 at 32x32: images/s and seconds per 50,000-image epoch.

Images: benchmarks/photos.py (real photographs at ImageNet's typical 500x375, q90) written as
shards. The last line is `ratio: X`, end to end (the faster of 2a, 2b) / the ceiling of (1).
`--device cpu --smoke` runs every path small on a CPU, to check the script, not to time it.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from photos import make_photos
from pipelines.config import load_config
from pipelines.data import build_datasets, epoch_batches, to_device
from pipelines.shards import Options, scan_folder, write_shards
from resnet_models import build_model, model_stats

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets, by device-name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L4": 121.0,
                    "A10G": 70.0, "L40S": 362.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One training step of a model in a given precision, layout, compile mode and optimizer."""

    def __init__(self, name: str, num_classes: int, device, amp: bool, channels_last: bool,
                 compile: bool, fused: bool):
        torch.manual_seed(0)
        self.model = build_model(name, num_classes=num_classes).to(device)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                   **({"fused": True} if fused else {"foreach": True}))
        self.forward = torch.compile(self.model) if compile else self.model
        self.amp, self.device = amp, device

    def __call__(self, x, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = F.cross_entropy(self.forward(x), y, ignore_index=-1)  # -1: an undecodable row
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def synthetic_rate(step: Step, batch: int, size: int, classes: int, steps: int, warmup: int) -> float:
    x = torch.randn(batch, 3, size, size, device=step.device)
    y = torch.randint(0, classes, (batch,), device=step.device)
    for _ in range(warmup):
        step(x, y)
    sync(step.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(step.device)
    return batch * steps / (time.perf_counter() - t0)


def cpu_decode_rate(step: Step, shards: Path, batch: int, steps: int, warmup: int) -> float:
    """Ray Data decodes and augments on CPU workers; the GPU normalises (pipelines.data)."""
    data = load_config(ROOT / "ray_config.yaml", [f"data.shards={shards}", "data.train_transform=rrc",
                                                   "data.crop_size=224", "data.flip=true",
                                                   "data.shuffle_buffer=0", "data.prefetch_batches=8"]).data
    train_ds, _, _ = build_datasets(data, seed=0)
    done, t0, epoch = 0, None, 0
    while done < warmup + steps:
        epoch += 1
        for b in epoch_batches(train_ds, data, epoch, 0, batch, train=True):
            x, y = to_device(b, step.device, data, channels_last=step.channels_last)
            step(x, y)
            done += 1
            if done == warmup:
                sync(step.device)
                t0 = time.perf_counter()
            if done == warmup + steps:
                break
    sync(step.device)
    return batch * steps / (time.perf_counter() - t0)


def gpu_decode_rate(step: Step, shards: Path, batch: int, steps: int, warmup: int) -> float:
    """JPEG bytes read on the CPU; decode, RandomResizedCrop, flip and normalisation on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2 as T
    files = sorted((shards / "train").glob("*.parquet"))
    rows = [(r["image"], r["label"]) for f in files for r in pq.read_table(f, columns=["image", "label"]).to_pylist()]
    crop = T.Compose([T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip()])
    mean = torch.tensor([0.485, 0.456, 0.406], device=step.device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=step.device).view(1, 3, 1, 1) * 255
    rng = np.random.default_rng(0)

    def batches():
        while True:  # a new order each pass, as an epoch
            order = rng.permutation(len(rows))
            for i in range(0, len(order) - batch + 1, batch):
                chunk = [rows[j] for j in order[i:i + batch]]
                data = [torch.frombuffer(bytearray(r[0]), dtype=torch.uint8) for r in chunk]
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=step.device)  # one batched call
                x = torch.stack([crop(im) for im in images]).float().sub_(mean).div_(std)
                yield x, torch.tensor([r[1] for r in chunk], device=step.device)

    it = batches()
    for _ in range(warmup):
        step(*next(it))
    sync(step.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    sync(step.device)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256, help="ResNet-50 batch per step")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--images", type=int, default=4096, help="photographs written as shards for the end-to-end runs")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) - 1, help="Ray Data CPU workers")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (CPU)")
    a = p.parse_args()
    if a.smoke:
        a.batch, a.steps, a.warmup, a.images, a.no_compile = 4, 2, 1, 64, True
    device = torch.device(a.device)
    name = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    print(f"device: {name}; torch {torch.__version__}; batch {a.batch}, {a.steps} timed steps after {a.warmup}")

    size = 64 if a.smoke else 224
    flops = 2 * model_stats(build_model("resnet50"), (3, 224, 224))["macs"]  # forward FLOPs per image
    peak = peak_tflops(device)
    rows = []

    def row(label, rate, mfu_flops=None):
        mfu = f"{3 * mfu_flops * rate / (peak * 1e12):.1%}" if (peak and mfu_flops) else "n/a"
        rows.append((label, rate))
        print(f"{label:<44} {rate:>9,.0f} img/s   MFU {mfu}", flush=True)

    print(f"\n1. ResNet-50 synthetic {size}x{size}, the compute ceiling")
    variants = [("fp32", False, False, False, False), ("bf16 autocast", True, False, False, False),
                ("bf16 + channels_last", True, True, False, False),
                ("bf16 + channels_last + fused SGD", True, True, False, True)]
    if not a.no_compile:
        variants.append(("bf16 + channels_last + fused SGD + compile", True, True, True, True))
    best, best_rate = None, 0.0
    for label, amp, cl, comp, fused in variants:
        if fused and device.type != "cuda":
            continue  # fused SGD is a CUDA kernel
        step = Step("resnet50", 1000, device, amp, cl, comp, fused)
        rate = synthetic_rate(step, a.batch, size, 1000, a.steps, a.warmup + (10 if comp else 0))
        row(label, rate, flops if size == 224 else None)
        if rate > best_rate:
            best, best_rate = (amp, cl, comp, fused), rate
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\n2. ResNet-50 end to end from JPEG shards, the fastest step above")
    import ray
    import ray.data
    from pipelines.ray_internals import setup_process
    from pipelines.runtime import SETUP_HOOK
    setup_process()  # as the training job's processes are set up
    ray.init(address="local", num_cpus=max(a.workers, 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    e2e = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        photos, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        make_photos(photos, a.images)
        write_shards(scan_folder(photos, 0.1 if a.smoke else 0.01, 0), shards, Options(rows_per_shard=256),
                     workers=max(a.workers, 1), progress=None)
        step = Step("resnet50", 4, device, *best)
        rate = cpu_decode_rate(step, shards, a.batch, a.steps, a.warmup)
        row(f"a. decode on {a.workers} CPU workers (Ray Data)", rate, flops)
        e2e = max(e2e, rate)
        if device.type == "cuda":
            rate = gpu_decode_rate(step, shards, a.batch, a.steps, a.warmup)
            row("b. decode on the GPU (nvjpeg, batched)", rate, flops)
            e2e = max(e2e, rate)
        else:
            print("b. decode on the GPU: not measured (no CUDA device)")
            if a.smoke:  # the same code path on the CPU, to check it
                rate = gpu_decode_rate(step, shards, a.batch, a.steps, a.warmup)
                print(f"   (smoke: the GPU-decode path run on {device.type}: {rate:,.0f} img/s)")
    ray.shutdown()

    print("\n4. CIFAR ResNets at 32x32, the fastest step above")
    for depth in (20, 56):
        step = Step(f"cifar_resnet{depth}", 10, device, *best)
        rate = synthetic_rate(step, 128 if not a.smoke else 4, 32, 10, a.steps, a.warmup)
        print(f"cifar_resnet{depth:<31} {rate:>9,.0f} img/s   {50_000 / rate:,.1f} s per 50,000-image epoch")

    if peak is None:
        print("\nMFU: not measured (no known bf16 peak for this device)")
    print(f"\nend to end / synthetic ceiling: {e2e:,.0f} / {best_rate:,.0f}")
    print(f"ratio: {e2e / best_rate:.2f}")


if __name__ == "__main__":
    main()
