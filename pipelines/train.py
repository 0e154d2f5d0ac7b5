"""Train a ResNet:  python -m pipelines.train --config ray_config.yaml [key=value ...]

Reads top to bottom: config -> data (shards streamed by Ray Data, see pipelines/data.py) ->
model -> optimizer and schedule -> epochs, one table row each. For now the loop runs in this one
process; the Ray Train DDP job wraps the same loop (see the project's issues).
"""
from __future__ import annotations

import math
import time

import pyarrow.fs
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import Config, OptimSection, ScheduleSection, parse_cli
from pipelines.data import build_datasets, epoch_batches, to_device
from resnet_models import build_model, model_stats


def make_optimizer(model: nn.Module, optim: OptimSection, global_batch: int) -> torch.optim.SGD:
    """SGD with the learning rate scaled linearly from lr_batch to the global batch."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # BN weights and all biases are the 1-d parameters
        (no_decay if optim.no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=optim.lr * global_batch / optim.lr_batch,
                           momentum=optim.momentum, nesterov=optim.nesterov)


def lr_factor(step: int, steps_per_epoch: int, s: ScheduleSection) -> float:
    """Multiplier of the peak learning rate at an iteration: step or cosine decay, linear warm-up."""
    epoch = step / steps_per_epoch
    if s.kind == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(epoch / s.epochs, 1.0)))
    else:
        at = step if s.milestone_unit == "iteration" else epoch
        factor = s.gamma ** sum(at >= m for m in s.milestones)
    if epoch < s.warmup_epochs:
        factor *= (step + 1) / (s.warmup_epochs * steps_per_epoch)
    return factor


def evaluate(model: nn.Module, batches, cfg: Config, device: torch.device) -> tuple[float, float, int]:
    """Top-1 and top-5 error, and the number of images seen."""
    model.eval()
    top1 = top5 = seen = 0
    with torch.no_grad():
        for batch in batches:
            x, t = to_device(batch, device, cfg.data, channels_last=False)
            k = model(x).topk(min(5, model.fc.out_features), dim=1).indices
            top1 += (k[:, 0] == t).sum().item()
            top5 += (k == t[:, None]).any(dim=1).sum().item()
            seen += len(t)
    return 1 - top1 / max(seen, 1), 1 - top5 / max(seen, 1), seen


def save_text(uri: str, name: str, text: str) -> None:
    """Write a small file beside a run's outputs: a local path or an s3:// / gs:// URI."""
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())


def train(cfg: Config) -> dict:
    torch.manual_seed(cfg.run.seed)
    save_text(cfg.run_dir, "config.yaml", cfg.to_yaml())
    device = torch.device("cpu")

    train_ds, val_ds, manifest = build_datasets(cfg.data, cfg.run.seed)
    n_train, n_val = (manifest["splits"][s]["rows"] for s in ("train", "val"))
    classes = manifest["classes"]
    model = build_model(cfg.model, num_classes=len(classes))
    stats = model_stats(model, (3, cfg.data.crop_size, cfg.data.crop_size))
    print(f"{cfg.model.name}: {stats['params']:,} parameters, {stats['macs'] / 1e6:.1f}M MACs per image; "
          f"{n_train} train / {n_val} val images, {len(classes)} classes; outputs in {cfg.run_dir}")

    batch = cfg.data.batch_size
    steps_per_epoch = max(n_train // batch, 1)  # the final partial batch is dropped
    opt = make_optimizer(model, cfg.optim, batch)
    peak = [g["lr"] for g in opt.param_groups]
    s = cfg.schedule
    warming = s.warmup_lr is not None  # the ResNet-110 recipe: hold a small lr until error drops
    lighting = torch.Generator().manual_seed(cfg.run.seed)

    print(f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'train_err':>9} {'val_err':>8} {'val_top5':>8} "
          f"{'img/s':>7} {'wait':>5} {'time':>6}")
    step, history = 0, []
    for epoch in range(1, s.epochs + 1):
        model.train()
        t0, loss_sum, wrong, seen, waited = time.perf_counter(), 0.0, 0, 0, 0.0
        batches = iter(epoch_batches(train_ds, cfg.data, epoch, cfg.run.seed, batch, train=True))
        while True:
            tw = time.perf_counter()
            b = next(batches, None)
            waited += time.perf_counter() - tw
            if b is None:
                break
            x, y = to_device(b, device, cfg.data, channels_last=False, generator=lighting)
            for g, p in zip(opt.param_groups, peak):
                g["lr"] = s.warmup_lr if warming else p * lr_factor(step, steps_per_epoch, s)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            wrong += (logits.argmax(1) != y).sum().item()
            seen += len(y)
        train_time = time.perf_counter() - t0
        train_err = wrong / max(seen, 1)
        if warming and train_err < s.warmup_until_error:
            warming = False
        val_err, val_top5, val_seen = evaluate(model, epoch_batches(val_ds, cfg.data, epoch, cfg.run.seed,
                                                                    batch, train=False), cfg, device)
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
               "train_error": train_err, "val_error": val_err, "val_top5_error": val_top5,
               "images_per_s": seen / train_time, "data_wait": waited / train_time,
               "epoch_time_s": time.perf_counter() - t0,
               # rows the manifest promises but the epoch did not deliver: undecodable records,
               # plus the dropped final partial batch
               "train_missing": n_train - seen, "val_missing": n_val - val_seen}
        history.append(row)
        print(f"{epoch:>5} {row['lr']:>8.4f} {row['train_loss']:>10.4f} {train_err:>9.2%} {val_err:>8.2%} "
              f"{val_top5:>8.2%} {row['images_per_s']:>7.0f} {row['data_wait']:>5.0%} "
              f"{row['epoch_time_s']:>5.1f}s", flush=True)
    return {"model": model, "stats": stats, "history": history, "manifest": manifest}


def quiet_ray_data() -> None:
    """One table row per epoch on the console: Ray Data's per-execution progress goes to its logs."""
    import logging

    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(argv, "Train a ResNet on the configured data (see ray_config.yaml).")
    quiet_ray_data()
    train(cfg)


if __name__ == "__main__":
    main()
