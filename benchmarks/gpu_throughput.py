"""ResNet-50 training images/s on one GPU, the product against the ceiling:  python benchmarks/gpu_throughput.py

Rows, all on the same JPEG shards in one run:
1. the compute ceiling on synthetic data, 224x224: fp32; bf16 autocast; + channels_last; + fused
   SGD; + torch.compile; each as the product's step runs it (cuDNN's autotuning on GPUs);
2. the input alone, no model, through the product's input (a training worker's planned rows,
   pipelines.plan, read by a Ray Data pipeline of its own, then pipelines.feed), RandomResizedCrop(224)
   + flip: the encoded rows alone reaching the worker (the host's side of b); a. decoded by Ray
   Data on the CPUs, copied from pinned memory (data.decode=cpu); b. decoded and augmented on the
   GPU (data.decode=gpu);
3. end to end in this process: (2)'s feed into the fastest step of (1);
4. end to end through the product: `python -m pipelines.train` with an ImageNet-style config
   (ResNet-50, 224, RandomResizedCrop + flip, one GPU worker, Ray Data ingest, MLflow on, its
   defaults for GPUs), images/s read from its own epoch table, the last epoch after warm-up ones;
   4b. one epoch of the same with RAY_RESNET_CHECK_SYNCS=1: the first op of a step or validation
   batch that makes the host wait for the GPU (pipelines.recipe.NoHostSync), or none;
5. CIFAR ResNet-20 and ResNet-56 at 32x32: images/s and seconds per 50,000-image epoch;
6. the ceiling with CUDA graphs (compile mode reduce-overhead): one more compile of ResNet-50, last
   so that a run stopped by its time limit has every row before it.
Model FLOPs utilisation: 3 x forward FLOPs per image x images/s, against the GPU's dense bf16 peak.

Images: --photos real photographs (benchmarks/photos.py, varied: 500 pixels on the long side, the
short side 375 for half of them and 300 to 450 for the others, q90), linked under new names up to
--images training images in --classes classes, written as shards; decoding the same bytes twice
costs what two photos do. ImageNet's 1000 classes: the product's ResNet-50 is then the ceiling's,
whose compile it takes from inductor's cache instead of compiling it again.
`ratio: X` is (4) / the ceiling: printed after (4) against (1), and again as the last line against
the fastest of (1) and (6), so a run stopped early keeps its first. --profile DIR: 5 steps of the
product's second epoch profiled into DIR (RAY_RESNET_PROFILE, docs/gpu.md).
`--device cpu --smoke` runs every row small on a CPU, to check the script, not to time it.
`--rows 5,6` runs those rows alone (1 as well for 3 and 4): what a run stopped by its time limit did
not reach.
On a GPU machine without Ray or MLflow: benchmarks/gpu_check.sh (installs the carried wheels first).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from photos import make_photos  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.console import TABLE  # noqa: E402
from pipelines.recipe import Numerics, step_forward  # noqa: E402
from pipelines.shards import Options, scan_folder, write_shards  # noqa: E402
from resnet_models import build_model, model_stats  # noqa: E402

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
                 compile: str | None, fused: bool):
        torch.manual_seed(0)
        self.model = build_model(name, num_classes=num_classes).to(device)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                   **({"fused": True} if fused else {"foreach": True}))
        if compile:  # each model's compile from a clean cache, as in a training process of its own
            torch._dynamo.reset()
        self.forward = step_forward(self.model, Numerics(None, channels_last, compile), device)  # as the product
        self.amp, self.device = amp, device

    def __call__(self, x, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = F.cross_entropy(self.forward(x), y, ignore_index=-1)  # -1: an undecodable row
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def timed(run, device, batch: int, steps: int, warmup: int) -> float:
    """images/s of run(i) over steps calls after warmup calls, waiting for the device at both ends."""
    for i in range(warmup):
        run(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        run(warmup + i)
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def synthetic_rate(step: Step, batch: int, size: int, classes: int, steps: int, warmup: int) -> float:
    x = torch.randn(batch, 3, size, size, device=step.device)
    y = torch.randint(0, classes, (batch,), device=step.device)
    return timed(lambda i: step(x, y), step.device, batch, steps, warmup)


def input_overrides(shards: Path, a) -> list[str]:
    """ImageNet-style input from these shards, one worker: RandomResizedCrop(224) + flip, validation
    at 256 then the centre 224 (rows 2-4 alike)."""
    return [f"data.shards={shards}", "data.train_transform=rrc", f"data.crop_size={a.size}",
            f"data.val_resize={a.size * 8 // 7}", "data.flip=true", f"data.batch_size={a.batch}",
            f"data.shuffle_buffer={max(2048, 2 * a.batch)}", "scaling.num_workers=1"]


def bench_config(shards: Path, a, decode: str):
    """The product's config for these shards, decoding on the CPUs (cpu) or the device (gpu)."""
    return load_config(ROOT / "ray_config.yaml", [*input_overrides(shards, a), f"data.decode={decode}"])


def feed_batches(cfg, device, channels_last: bool, host_only: bool = False):
    """The product's training input for one worker, epoch after epoch: its planned rows (as
    pipelines.train reads them) through pipelines.feed, or with host_only the host batches alone."""
    from pipelines import plan
    from pipelines.data import epoch_batches, planned_dataset
    from pipelines.feed import epoch_feed
    from pipelines.shards import check_shards, fs_and_path
    units = plan.read_units(check_shards(cfg.data.shards, "train"))
    fs, batch, seed = fs_and_path(cfg.data.shards)[0], cfg.data.batch_size, cfg.run.seed
    epoch = 0
    while True:
        epoch += 1
        rows = plan.worker_rows(units, seed, epoch, batch, world=1, rank=0)
        source = planned_dataset(cfg.data, fs, units, plan.read_runs(units, rows), encoded=cfg.decode_on_device)
        if host_only:
            yield from epoch_batches(source, cfg.data, epoch, seed, batch, train=True)
        else:
            yield from epoch_feed(source, cfg, epoch, 0, device, channels_last, train=True, batch_size=batch)


def decode_alone(shards: Path, a, device, row) -> None:
    """Batched decode of a batch's JPEGs on the device, by each decoder that loads here; then the
    augmentation alone on the decoded batch (the feed's second thread)."""
    import numpy as np
    import pyarrow.parquet as pq
    from pipelines import codecs
    from pipelines.gpu_decode import BatchAugment, Decoded
    first = sorted((shards / "train").glob("*.parquet"))[0]
    encoded = pq.read_table(first, columns=["image"]).column("image").to_pylist()[:a.batch]
    encoded = (encoded * (a.batch // len(encoded) + 1))[:a.batch]
    for loader in (codecs._torchcodec, codecs._torchvision):
        try:
            name, _, decode_jpeg = loader()
        except Exception as e:  # noqa: BLE001 - not installed, or built for another torch
            print(f"   decode alone, {loader.__name__[1:]}: does not load here ({type(e).__name__})")
            continue
        row(f"   decode alone, {name}", timed(lambda i: decode_jpeg(encoded, mode="RGB", device=device),
                                              device, a.batch, a.steps, a.warmup), training=False)
    augment = BatchAugment(bench_config(shards, a, "gpu").data, True, device, np.random.default_rng(0),
                           channels_last=True)
    decoded = Decoded(codecs.decode_jpegs(encoded, device), torch.zeros(a.batch, dtype=torch.long), a.batch, 0)
    sizes = len({tuple(image.shape) for image in decoded.images})
    row(f"   augment alone ({sizes} image sizes in the batch)", timed(lambda i: augment.augment(decoded), device,
                                                                     a.batch, a.steps, a.warmup), training=False)


def run_product(shards: Path, a, home: Path, device, epochs: int, name: str, env: dict | None = None,
                overrides: tuple = ()) -> tuple[int, list[str], str]:
    """python -m pipelines.train on the shards, its console shown as it comes (a run stopped by a
    time limit still shows how far it got): (exit code, its console's lines, the end of its log)."""
    gpu = device.type == "cuda"
    args = [
        *input_overrides(shards, a), "data.decode=auto", "model.family=imagenet", f"model.depth={a.depth}",
        "optim.lr_batch=256", f"schedule.epochs={epochs}", "schedule.milestones=[]",
        f"scaling.gpus_per_worker={1 if gpu else 0}", f"scaling.cpus_per_worker={a.train_cpus}",
        f"scaling.compile={'off' if a.no_compile else 'auto'}",
        "tune.space={}", f"run.name={name}", "run.progress_s=0", f"checkpoint.storage_path={home / 'runs'}",
        *overrides]
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.train", "--config", str(ROOT / "ray_config.yaml"),
                                 *args], cwd=ROOT, env={**base, "RAY_RESNET_HOME": str(home), **(env or {})},
                                stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print("   " + lines[-1], flush=True)
        proc.wait()
        err.seek(0)
        return proc.returncode, lines, err.read()[-4000:]


def product_rate(shards: Path, a, home: Path, device) -> float:
    """The product's images/s: the last of its a.epochs epochs, from its own epoch table. With
    a.profile, a few steps of its second epoch profiled into that folder (RAY_RESNET_PROFILE)."""
    code, lines, log = run_product(shards, a, home, device, a.epochs, "gpu-throughput",
                                   {"RAY_RESNET_PROFILE": str(a.profile)} if a.profile else None)
    if code != 0:
        raise SystemExit(f"pipelines.train failed (exit {code}):\n{log}")
    column = [key for key, *_ in TABLE].index("images_per_s")
    # an epoch row: a number (or a share, or seconds) in each of the table's columns; not the
    # profile's summary ("5 steps in ...") or any other line that starts with a number
    rows = [cells for line in lines if len(cells := line.split()) >= len(TABLE)
            and all(re.fullmatch(r"[\d.,]+[%s]?", cell) for cell in cells[:len(TABLE)])]
    if len(rows) != a.epochs:
        raise SystemExit(f"pipelines.train printed {len(rows)} epoch rows, expected {a.epochs}")
    for path in sorted(a.profile.glob("gpu-throughput-epoch*")) if a.profile else ():
        print(f"   profile: {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")
    return float(rows[-1][column])


def host_syncs(shards: Path, a, home: Path, device) -> str:
    """An epoch of the product with RAY_RESNET_CHECK_SYNCS=1 (pipelines.recipe.NoHostSync, eager):
    'none', or the first op it stopped at."""
    code, lines, log = run_product(shards, a, home, device, 1, "gpu-host-syncs", {"RAY_RESNET_CHECK_SYNCS": "1"},
                                   ("run.max_failures=0",))
    if code == 0:
        return "none in its steps and validation"
    found = [line for line in lines + log.splitlines() if "HostSync" in line]
    return found[0].strip() if found else f"pipelines.train failed (exit {code}):\n{log}"


ROWS = ("1", "2", "3", "4", "4b", "5", "6")


def rows_arg(text: str) -> set[str]:
    """--rows: the rows named, and 1 with 3 or 4, which are read against it."""
    rows = {r.strip() for r in text.split(",") if r.strip()}
    if not rows or rows - set(ROWS):
        raise argparse.ArgumentTypeError(f"{text!r}: give rows from {','.join(ROWS)}, comma-separated")
    return rows | ({"1"} if {"3", "4"} & rows else set())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Every row runs small on a CPU with --device cpu --smoke (a test does).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256, help="ResNet-50 batch per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps before them (default: %(default)s)")
    p.add_argument("--photos", type=int, default=2048, help="distinct photographs (default: %(default)s)")
    p.add_argument("--images", type=int, default=40960,
                   help="training images in the shards, the photos linked under new names (default: %(default)s)")
    p.add_argument("--classes", type=int, default=1000,
                   help="classes of the images and of every ResNet-50 row (default: %(default)s, ImageNet's)")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs of the product's run; the last one is the figure (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="CPUs for Ray Data in rows 2-3 (default: all but --train-cpus, as in the product's run)")
    p.add_argument("--train-cpus", type=int, default=4,
                   help="scaling.cpus_per_worker of the product's run: the training process's share (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (rows and the product's run)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every row runs (CPU)")
    p.add_argument("--profile", type=lambda text: Path(text).resolve(), metavar="DIR",
                   help="profile a few steps of the product's second epoch (row 4) into DIR: a Chrome trace, "
                        "and its summary (also in the product's console) with a table of ops (RAY_RESNET_PROFILE, "
                        "docs/gpu.md)")
    p.add_argument("--rows", default=",".join(ROWS), type=rows_arg,
                   help="the rows to run, e.g. 5,6 to finish a run its time limit stopped (default: all); 1 runs "
                        "too with 3 or 4, which are read against it")
    a = p.parse_args()
    if not a.smoke and (a.classes > min(a.photos, a.images) or a.images < 2 * a.classes + 1):
        p.error(f"--classes {a.classes}: give at most --photos ({a.photos}) classes, and --images ({a.images}) at "
                "least twice as many plus one (a training and a validation image of each class)")
    a.depth, a.size = 50, 224
    if a.smoke:
        a.batch, a.steps, a.warmup, a.photos, a.images, a.classes, a.no_compile = 4, 2, 1, 16, 64, 4, True
        a.depth, a.size, a.epochs, a.train_cpus = 18, 64, 2, 1
    if a.workers is None:  # the training process keeps the cores it needs for its feed and Ray's threads
        a.workers = max(1, len(os.sched_getaffinity(0)) - a.train_cpus)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    name = device.type + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
    from pipelines import codecs
    print(f"device: {name}; torch {torch.__version__}; image decoder: {codecs.DECODER}; batch {a.batch}, "
          f"{a.steps} timed steps after {a.warmup}; {a.images:,} training images", flush=True)

    model = f"resnet{a.depth}"
    flops = 2 * model_stats(build_model(model), (3, a.size, a.size))["macs"]  # forward FLOPs per image
    peak = peak_tflops(device)

    def row(label, rate, training=True):
        mfu = f"MFU {3 * flops * rate / (peak * 1e12):.1%}" if peak and training else ""
        print(f"{label:<52} {rate:>9,.0f} img/s   {mfu}", flush=True)
        return rate

    variants = [("fp32", False, False, None, False), ("bf16 autocast", True, False, None, False),
                ("bf16 + channels_last", True, True, None, False)]
    if cuda:  # fused SGD is a CUDA kernel
        variants.append(("bf16 + channels_last + fused SGD", True, True, None, True))
    if not a.no_compile:
        variants.append(("bf16 + channels_last + fused SGD + compile", True, True, "default", cuda))

    def synthetic(variants):
        """The fastest variant's (Step, images/s)."""
        best, best_rate = None, 0.0
        for label, amp, cl, comp, fused in variants:
            step = Step(model, a.classes, device, amp, cl, comp, fused)
            rate = row(label, synthetic_rate(step, a.batch, a.size, a.classes, a.steps, a.warmup + (10 if comp else 0)))
            if rate > best_rate:
                best, best_rate = step, rate
            del step
            if cuda:
                torch.cuda.empty_cache()
        return best, best_rate

    best, best_rate, product = None, None, None
    if "1" in a.rows:
        print(f"\n1. {model} on synthetic {a.size}x{a.size} data: the compute ceiling")
        best, best_rate = synthetic(variants)
        print(f"   the ceiling: {best_rate:,.0f} img/s")

    if {"2", "3", "4", "4b"} & a.rows:
        with tempfile.TemporaryDirectory() as tmp:
            shards = write_photos(Path(tmp), a)
            if {"2", "3"} & a.rows:
                input_rows(shards, a, device, row, best)
            best = None  # its memory, before the product trains
            if cuda:
                torch.cuda.empty_cache()
            if "4" in a.rows:
                print(f"\n4. end to end through the product: python -m pipelines.train, {a.epochs} epochs")
                product = row(f"pipelines.train, epoch {a.epochs}", product_rate(shards, a, Path(tmp) / "home", device))
                print(f"ratio: {product / best_rate:.2f}   (against the ceiling of 1)", flush=True)
            if "4b" in a.rows:
                print("\n4b. the same for one epoch with RAY_RESNET_CHECK_SYNCS=1 (eager): does a step wait for the "
                      "GPU?")
                print(f"host syncs: {host_syncs(shards, a, Path(tmp) / 'home', device)}", flush=True)

    if "5" in a.rows:
        print("\n5. CIFAR ResNets at 32x32, batch 128, bf16 + channels_last" + ("" if a.no_compile else " + compile"))
        for depth in (20, 56):
            step = Step(f"cifar_resnet{depth}", 10, device, True, True, None if a.no_compile else "default", cuda)
            batch = 4 if a.smoke else 128
            rate = synthetic_rate(step, batch, 32, 10, a.steps, a.warmup + (0 if a.no_compile else 10))
            print(f"cifar_resnet{depth:<40} {rate:>9,.0f} img/s   {50_000 / rate:,.1f} s per 50,000-image epoch",
                  flush=True)

    if "6" in a.rows and a.no_compile:
        print("\n6. not run: CUDA graphs are a compile mode, and --no-compile is given")
    elif "6" in a.rows:
        print(f"\n6. {model} on synthetic data with CUDA graphs")
        _, graphs = synthetic([("bf16 + channels_last + fused SGD + CUDA graphs", True, True, "reduce-overhead",
                                cuda)])
        best_rate = max(best_rate or 0.0, graphs)

    if peak is None:
        print("\nMFU: not measured (no known bf16 peak for this device)")
    if product:
        print(f"\nthe product end to end / the synthetic ceiling: {product:,.0f} / {best_rate:,.0f}")
        print(f"ratio: {product / best_rate:.2f}")


def write_photos(tmp: Path, a) -> Path:
    """The benchmark's JPEG shards in tmp/shards (see the module's docstring)."""
    photos, shards = tmp / "photos", tmp / "shards"
    t0 = time.perf_counter()
    make_photos(photos, min(a.photos, a.images), varied=True, classes=a.classes)
    originals = sorted(photos.rglob("*.JPEG"))
    for i in range(len(originals), a.images):  # more names for the same bytes
        src = originals[i % len(originals)]
        os.link(src, src.parent / f"copy{i:06d}.JPEG")
    val = max(0.02, 8 / a.images, (a.classes + 1) / a.images)  # the stratified split: one a class at least
    write_shards(scan_folder(photos, val, 0), shards, Options(rows_per_shard=256),
                 workers=max(a.workers, 1), progress=None)
    print(f"\n(shards of {a.images:,} images written in {time.perf_counter() - t0:.0f} s)")
    return shards


def input_rows(shards: Path, a, device, row, best: Step | None) -> None:
    """Rows 2 and 3 (those in a.rows), in a Ray started here for them; 3 feeds row 1's fastest step."""
    import ray
    from pipelines.ray_internals import quiet_ray_data, setup_process
    from pipelines.runtime import SETUP_HOOK
    setup_process()  # as the training job's processes are set up
    ray.init(address="local", num_cpus=max(a.workers, 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": SETUP_HOOK}, logging_level=logging.ERROR)
    quiet_ray_data()
    paths = [("a", "cpu", f"decoded by Ray Data on {a.workers} CPU{'s' if a.workers > 1 else ''}"),
             ("b", "gpu", f"decoded on the {device.type}")]
    if "2" in a.rows:
        print("\n2. the input alone: the JPEG decoders and the augmentation (RandomResizedCrop + flip) on one batch, "
              "then the product's feed")
        decode_alone(shards, a, device, row)
        batches = feed_batches(bench_config(shards, a, "gpu"), device, channels_last=True, host_only=True)
        row("   encoded rows alone, reaching the worker", timed(lambda i: next(batches), device, a.batch, a.steps,
                                                               a.warmup), training=False)
        batches.close()
        for key, decode, label in paths:
            batches = feed_batches(bench_config(shards, a, decode), device, channels_last=True)
            row(f"{key}. {label}", timed(lambda i: next(batches), device, a.batch, a.steps, a.warmup), training=False)
            batches.close()
    if "3" in a.rows:
        print("\n3. end to end in this process: the feed into the fastest step of 1")
        for key, decode, label in paths:
            batches = feed_batches(bench_config(shards, a, decode), device, channels_last=best.channels_last)

            def train(i):
                b = next(batches)
                best(b.x, b.y)
            row(f"{key}. {label}", timed(train, device, a.batch, a.steps, a.warmup))
            batches.close()
    ray.shutdown()

if __name__ == "__main__":
    main()
