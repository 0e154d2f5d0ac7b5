"""Train a ResNet:  python -m pipelines.train --config ray_config.yaml [key=value ...]

Reads top to bottom: config -> data -> model -> optimizer and schedule -> epochs, one table row
each. This is the single-process loop on the bundled digits; the Ray Train DDP job replaces the
loop and the in-memory data (see the project's issues), keeping the optimizer and schedule.
"""
from __future__ import annotations

import math
import time

import pyarrow.fs
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import Config, DataSection, OptimSection, ScheduleSection, parse_cli
from resnet_models import build_model, model_stats


def digits_tensors(data: DataSection, seed: int):
    """scikit-learn's 1,797 real 8x8 digits as 3x{s}x{s} float images, stratified train/val split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0        # N,1,8,8 in [0, 1]
    x = F.interpolate(x, size=data.image_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target)
    tr, va = train_test_split(torch.arange(len(y)).numpy(), test_size=data.val_fraction,
                              stratify=y.numpy(), random_state=seed)
    x = (x - x[tr].mean()) / x[tr].std()  # statistics of the training images only
    return (x[tr], y[tr]), (x[va], y[va]), [str(c) for c in d.target_names]


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


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """Top-1 and top-5 error on (x, y)."""
    model.eval()
    top1 = top5 = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits, t = model(x[i:i + batch]), y[i:i + batch]
            k = logits.topk(min(5, logits.size(1)), dim=1).indices
            top1 += (k[:, 0] == t).sum().item()
            top5 += (k == t[:, None]).any(dim=1).sum().item()
    return 1 - top1 / len(y), 1 - top5 / len(y)


def save_text(uri: str, name: str, text: str) -> None:
    """Write a small file beside a run's outputs: a local path or an s3:// / gs:// URI."""
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())


def train(cfg: Config) -> dict:
    torch.manual_seed(cfg.run.seed)
    save_text(cfg.run_dir, "config.yaml", cfg.to_yaml())

    (xtr, ytr), (xva, yva), classes = digits_tensors(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, num_classes=len(classes))
    stats = model_stats(model, (3, cfg.data.image_size, cfg.data.image_size))
    print(f"{cfg.model.name}: {stats['params']:,} parameters, {stats['macs'] / 1e6:.1f}M MACs per image; "
          f"{len(ytr)} train / {len(yva)} val images, {len(classes)} classes; outputs in {cfg.run_dir}")

    batch = cfg.data.batch_size
    steps_per_epoch = len(ytr) // batch or 1
    opt = make_optimizer(model, cfg.optim, batch)
    peak = [g["lr"] for g in opt.param_groups]
    s = cfg.schedule
    warming = s.warmup_lr is not None  # the ResNet-110 recipe: hold a small lr until error drops

    print(f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'train_err':>9} {'val_err':>8} {'val_top5':>8} "
          f"{'img/s':>7} {'time':>6}")
    step, history = 0, []
    gen = torch.Generator().manual_seed(cfg.run.seed)
    for epoch in range(1, s.epochs + 1):
        model.train()
        t0, loss_sum, wrong, seen = time.perf_counter(), 0.0, 0, 0
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(steps_per_epoch):  # the last partial batch is dropped, as drop_last=True
            idx = order[i * batch:(i + 1) * batch]
            x, y = xtr[idx], ytr[idx]
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
        train_err = wrong / seen
        if warming and train_err < s.warmup_until_error:
            warming = False
        val_err, val_top5 = evaluate(model, xva, yva, batch)
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / seen,
               "train_error": train_err, "val_error": val_err, "val_top5_error": val_top5,
               "images_per_s": seen / train_time, "epoch_time_s": time.perf_counter() - t0}
        history.append(row)
        print(f"{epoch:>5} {row['lr']:>8.4f} {row['train_loss']:>10.4f} {train_err:>9.2%} {val_err:>8.2%} "
              f"{val_top5:>8.2%} {row['images_per_s']:>7.0f} {row['epoch_time_s']:>5.1f}s", flush=True)
    return {"model": model, "stats": stats, "history": history}


def main(argv: list[str] | None = None) -> None:
    train(parse_cli(argv, "Train a ResNet on the configured data (see ray_config.yaml)."))


if __name__ == "__main__":
    main()
