"""Train a ResNet with DDP on Ray Train:  python -m pipelines.train --config ray_config.yaml [key=value ...]

Reads top to bottom:
  fit (the driver): preflight checks, before any worker starts -> shards as Ray Datasets ->
      TorchTrainer (workers, checkpoints, restarts) -> the best and final model into MLflow.
  train_loop (each worker): model (DDP) -> optimizer and schedule -> resume from the latest
      checkpoint -> epochs: train, evaluate, checkpoint + ray.train.report, MLflow and dashboard
      gauges from rank 0, one table row each.

The same run.name resumes: Ray Train finds the run's checkpoints under checkpoint.storage_path,
the loop continues after the last finished epoch, and the MLflow run continues with it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow.fs
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from ray.train import DataConfig
from torch import nn

from pipelines.config import HOME, Config, ConfigError, OptimSection, ScheduleSection, parse_cli
from pipelines.data import build_datasets, epoch_batches, load_manifest, shards_dir, to_device
from pipelines.shards import ShardError
import resnet_models
from resnet_models import build_model, model_stats

# Metrics reported per epoch (ray.train.report, MLflow, the table), in table order.
COLUMNS = ["lr", "train_loss", "train_error", "val_error", "val_top5_error", "images_per_s",
           "data_wait", "epoch_time_s"]


# ---------------------------------------------------------------------------------------------
# The recipe: optimizer and learning-rate schedule

def make_optimizer(model: nn.Module, optim: OptimSection, global_batch: int) -> torch.optim.SGD:
    """SGD with the learning rate scaled linearly from lr_batch to the global batch."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # BN weights and all biases are the 1-d parameters
        (no_decay if optim.no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = all(p.is_cuda for p in decay + no_decay)  # one kernel for the whole update on GPUs
    return torch.optim.SGD(groups, lr=optim.lr * global_batch / optim.lr_batch,
                           momentum=optim.momentum, nesterov=optim.nesterov, **({"fused": True} if fused else {}))


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


# ---------------------------------------------------------------------------------------------
# One worker's model and steps (no Ray here: tests drive these directly)

def precision(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last) for this device: bf16 and NHWC pay off on GPUs."""
    gpu = device.type == "cuda"
    amp = {"auto": torch.bfloat16 if gpu else None, "off": None,
           "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.scaling.amp]
    channels_last = {"auto": gpu, "on": True, "off": False}[cfg.scaling.channels_last]
    return amp, channels_last


def train_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, cfg: Config,
               amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward (DDP averages the gradients over workers), update: (logits, loss)."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.optim.label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return logits.detach(), loss.detach()


def evaluate(model: nn.Module, batches, cfg: Config, device: torch.device,
             amp: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """[top-1 correct, top-5 correct, images] summed over this worker's share of a split."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for batch in batches:
            x, t = to_device(batch, device, cfg.data, channels_last=channels_last)
            k = model(x).topk(min(5, model.fc.out_features), dim=1).indices
            sums += torch.tensor([(k[:, 0] == t).sum().item(), (k == t[:, None]).any(dim=1).sum().item(),
                                  len(t)], dtype=torch.float64)
    return sums


def all_sum(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or max) a small CPU tensor over the workers; the identity for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            u = t.cuda()
            dist.all_reduce(u, op=op or dist.ReduceOp.SUM)
            return u.cpu()
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------
# The worker loop

def train_loop(config: dict) -> None:
    """One Ray Train worker, from the run's latest checkpoint when it has one."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp, channels_last = precision(cfg, device)
    s, data = cfg.schedule, cfg.data
    steps_per_epoch = max(config["train_rows"] // world // cfg.local_batch, 1)

    torch.manual_seed(cfg.run.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's too)
    model = build_model(cfg.model, num_classes=config["num_classes"])
    if cfg.scaling.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # on the device; DDP (NCCL on GPUs, gloo on CPUs)
    net = unwrap(model)
    opt = make_optimizer(model, cfg.optim, data.batch_size)
    peak = [g["lr"] for g in opt.param_groups]
    warmup_lr = (s.warmup_lr or 0) * data.batch_size / cfg.optim.lr_batch  # given at lr_batch, like lr
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    forward = torch.compile(model) if cfg.scaling.compile else model
    lighting = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)

    epoch, step, history, run_id = 0, 0, [], config["mlflow_run_id"]
    warming = s.warmup_lr is not None  # the ResNet-110 recipe: hold a small lr until error drops
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(f"{d}/state.pt", map_location="cpu", weights_only=True)
            rng = Path(d, f"rng-{rank}.pt")
            rng = torch.load(rng, weights_only=False) if rng.exists() else None
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, warming, history = (state[k] for k in ("epoch", "step", "warming", "history"))
        if rng:  # same world size: each worker continues its own random streams
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            lighting.set_state(rng["lighting"])
            if torch.cuda.is_available() and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])

    nodes = len(set(gather(ray.get_runtime_context().get_node_id())))
    gauges, tracker = Gauges(cfg.run.name, rank), None
    if rank == 0:
        tracker = Tracker(config["mlflow_uri"], run_id)
        tracker.log_epochs(history)  # epochs checkpointed before a failure but not yet logged
        say(f"{cfg.run.name}: {cfg.model.name}: {world} workers on {nodes} node(s), {device.type}, global batch "
            f"{data.batch_size}; epochs {epoch + 1}..{s.epochs}" + (" (resumed)" if epoch else ""))
        say(header())

    if epoch >= s.epochs and history:
        if rank == 0:
            say(f"run {cfg.run.name} has trained its {epoch} epochs already: raise schedule.epochs to train "
                "on, or choose a new run.name")
        # Report the last epoch again: a sweep killed after this trial finished but before Tune
        # recorded it runs the trial again, and Tune needs its result.
        ray.train.report(history[-1])
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    while epoch < s.epochs:
        epoch += 1
        model.train()
        t0, waited = time.perf_counter(), 0.0
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, wrong, images
        batches = iter(epoch_batches(train_shard, data, epoch, cfg.run.seed, cfg.local_batch, train=True))
        while True:
            tw = time.perf_counter()
            b = next(batches, None)
            waited += time.perf_counter() - tw
            if b is None:
                break
            x, y = to_device(b, device, data, channels_last=channels_last, generator=lighting)
            for g, p in zip(opt.param_groups, peak):
                g["lr"] = warmup_lr if warming else p * lr_factor(step, steps_per_epoch, s)
            logits, loss = train_step(forward, opt, scaler, x, y, cfg, amp)
            step += 1
            sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) != y).sum().item(), len(y)],
                                 dtype=torch.float64)
        train_time = time.perf_counter() - t0
        loss_sum, wrong, seen = all_sum(sums.clone()).tolist()
        slowest = all_sum(torch.tensor([train_time], dtype=torch.float64), dist.ReduceOp.MAX).item()
        wait_share = all_sum(torch.tensor([waited / train_time], dtype=torch.float64)).item() / world
        train_error = wrong / max(seen, 1)
        if warming and train_error < s.warmup_until_error:
            warming = False

        val = evaluate(net, epoch_batches(val_shard, data, epoch, cfg.run.seed, cfg.local_batch, train=False),
                       cfg, device, amp, channels_last)
        top1, top5, val_seen = all_sum(val).tolist()
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
               "train_error": train_error, "val_error": 1 - top1 / max(val_seen, 1),
               "val_top5_error": 1 - top5 / max(val_seen, 1), "images_per_s": seen / slowest,
               "data_wait": wait_share, "epoch_time_s": time.perf_counter() - t0,
               # rows the manifest promises but the epoch did not deliver: undecodable records,
               # plus the dropped final partial batches
               "train_missing": config["train_rows"] - int(seen), "val_missing": config["val_rows"] - int(val_seen)}
        history.append(row)

        with tempfile.TemporaryDirectory() as d:  # every worker writes its RNG; rank 0 the rest
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "lighting": lighting.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            torch.save(rng, f"{d}/rng-{rank}.pt")
            if rank == 0:
                torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                            "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "warming": warming,
                            "history": history, "mlflow_run_id": run_id, "model_name": cfg.model.name,
                            "num_classes": config["num_classes"], "config": config["cfg"]}, f"{d}/state.pt")
            ray.train.report(row, checkpoint=Checkpoint.from_directory(d))
        gauges.set(images_per_s=(sums[2].item()) / train_time, train_loss=sums[0].item() / max(sums[2].item(), 1),
                   data_wait=waited / train_time, val_error=row["val_error"])
        if tracker:
            tracker.log_epochs(history)
            say(table_row(row))


def gather(value) -> list:
    """Every worker's value, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def say(text: str) -> None:
    """A line on the worker's real stdout, which Ray forwards to the driver (Ray Train's patched
    print would also log it, so it would appear twice)."""
    print(text, file=sys.__stdout__, flush=True)


def header() -> str:
    return (f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'train_err':>9} {'val_err':>8} {'val_top5':>8} "
            f"{'img/s':>7} {'wait':>5} {'time':>6}")


def table_row(r: dict) -> str:
    return (f"{r['epoch']:>5} {r['lr']:>8.4f} {r['train_loss']:>10.4f} {r['train_error']:>9.2%} "
            f"{r['val_error']:>8.2%} {r['val_top5_error']:>8.2%} {r['images_per_s']:>7.0f} "
            f"{r['data_wait']:>5.0%} {r['epoch_time_s']:>5.1f}s")


class Gauges:
    """Dashboard metrics on Ray's Prometheus endpoint: ray_resnet_{images_per_s,train_loss,data_wait,val_error}."""

    def __init__(self, run: str, rank: int):
        from ray.util.metrics import Gauge
        self.tags = {"run": run, "rank": str(rank)}
        self.gauges = {name: Gauge(f"resnet_{name}", description=text, tag_keys=("run", "rank"))
                       for name, text in [("images_per_s", "training images per second, this worker"),
                                          ("train_loss", "mean training loss of the last epoch, this worker"),
                                          ("data_wait", "share of the last epoch spent waiting for input"),
                                          ("val_error", "top-1 validation error after the last epoch (all workers)")]}

    def set(self, **values: float) -> None:
        for name, value in values.items():
            self.gauges[name].set(value, tags=self.tags)


# ---------------------------------------------------------------------------------------------
# MLflow: one run per training, continued across restarts and resumes

def mlflow_client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it if needed. With the embedded SQLite store the artifacts go
    beside it under RAY_RESNET_HOME, not into the working directory (a temporary copy under
    `ray job submit`)."""
    if uri.startswith("sqlite:"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = (HOME / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        raise


def flat_params(raw: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k != "space":
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


def open_run(cfg: Config, uri: str, experiment_id: str, stats: dict, parent_run_id: str | None = None) -> str:
    """The run's MLflow run id: the one recorded beside its checkpoints when the run resumes, else
    a new run with the resolved config, parameter count and MACs as params."""
    from mlflow.entities import Param
    client = mlflow_client(uri)
    known = read_text(cfg.run_dir, "mlflow_run_id")
    if known:
        with contextlib.suppress(Exception):  # a store that lost the run (or another store): a new run
            client.update_run(known.strip(), status="RUNNING")
            return known.strip()
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    run_id = client.create_run(experiment_id, run_name=cfg.run.name, tags=tags).info.run_id
    params = {**flat_params(cfg.model_dump(mode="json", exclude={"tune"})), "model.name": cfg.model.name,
              "params": str(stats["params"]), "macs": str(stats["macs"])}
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    save_text(cfg.run_dir, "mlflow_run_id", run_id)
    return run_id


class Tracker:
    """Rank 0's per-epoch metrics in the run's MLflow run (step = epoch), each epoch once: logged
    after its checkpoint is written, and on a restart any checkpointed epoch the run lacks."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = mlflow_client(uri), run_id
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "val_error")}

    def log_epochs(self, history: list[dict]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        for row in history:
            if row["epoch"] in self.logged:
                continue
            self.client.log_batch(self.run_id, metrics=[
                Metric(k, float(v), now, row["epoch"]) for k, v in row.items() if k != "epoch"])
            self.logged.add(row["epoch"])


def curves_png(history: list[dict], title: str, path: str) -> None:
    """Training (thin) and validation (bold) error against epoch, as the paper's Fig. 4."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [100 * r["train_error"] for r in history], lw=1, color="C0", label="train error")
    ax.plot(epochs, [100 * r["val_error"] for r in history], lw=2.5, color="C0", label="val error")
    ax.set(xlabel="epoch", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_checkpoint(result):
    """(checkpoint, metrics) of the lowest validation error among those kept, or None."""
    return min(result.best_checkpoints, key=lambda cm: cm[1]["val_error"]) if result.best_checkpoints else None


def load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(f"{d}/state.pt", map_location="cpu", weights_only=True)


@contextlib.contextmanager
def fluent_mlflow(uri: str):
    """mlflow's fluent API (log_model needs it) on uri, and afterwards the process as it was:
    set_tracking_uri also sets MLFLOW_TRACKING_URI, which later runs and child processes would inherit."""
    import mlflow
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unsets the variable too
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def log_final(cfg: Config, result, uri: str) -> None:
    """Into the run's MLflow run: the best and final model, the training curves."""
    import mlflow
    import mlflow.pytorch
    if result.checkpoint is None:
        return
    final = load_state(result.checkpoint)
    client = mlflow_client(uri)
    if client.get_run(final["mlflow_run_id"]).data.metrics.get("final_epoch") == final["epoch"]:
        return  # nothing trained since the models were logged
    best = best_checkpoint(result)
    best = load_state(best[0]) if best else final
    with tempfile.TemporaryDirectory() as d:
        curves_png(final["history"], f"{cfg.model.name} ({cfg.run.name})", f"{d}/curves.png")
        client.log_artifact(final["mlflow_run_id"], f"{d}/curves.png")
    # two images: MLflow exports the model with torch.export, which fixes a batch dimension of 1
    example = torch.zeros(2, 3, cfg.data.crop_size, cfg.data.crop_size).numpy()
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    with fluent_mlflow(uri), mlflow.start_run(run_id=final["mlflow_run_id"]):
        for name, state in (("best_model", best), ("final_model", final)):
            model = build_model(cfg.model, num_classes=state["num_classes"])
            model.load_state_dict(state["model"])
            mlflow.pytorch.log_model(model.eval(), name=name, input_example=example,
                                     pip_requirements=requirements,
                                     code_paths=[str(Path(resnet_models.__file__).parent)],
                                     params={"epoch": state["epoch"]})
        mlflow.log_metrics({"best_val_error": best["history"][-1]["val_error"], "best_epoch": best["epoch"],
                            "final_epoch": final["epoch"]})


# ---------------------------------------------------------------------------------------------
# The driver: checks, Ray, the trainer

def save_text(uri: str, name: str, text: str) -> None:
    """Write a small file beside a run's outputs: a local path or an s3:// / gs:// URI."""
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())


def read_text(uri: str, name: str) -> str | None:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(f"{path}/{name}") as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def has_checkpoints(uri: str) -> bool:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return any(i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos)


def preflight(cfg: Config) -> dict:
    """Every mistake we can see before a worker starts: shards, classes, storage, a resumed run
    of another model, the tracking store. Returns what the workers need to know."""
    try:
        directory = shards_dir(cfg.data)
        manifest = load_manifest(directory)
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    classes = len(manifest["classes"])
    if cfg.data.num_classes is not None and cfg.data.num_classes != classes:
        raise ConfigError(f"data.num_classes={cfg.data.num_classes}: {directory}/manifest.json lists "
                          f"{classes} classes; set data.num_classes={classes} or null")
    rows = {split: manifest["splits"][split]["rows"] for split in ("train", "val")}
    per_worker = rows["train"] // cfg.scaling.num_workers
    if per_worker < cfg.local_batch:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: each of the {cfg.scaling.num_workers} "
                          f"workers gets {per_worker} training images, fewer than its batch of "
                          f"{cfg.local_batch}; lower data.batch_size or scaling.num_workers")

    previous = read_text(cfg.run_dir, "config.yaml")
    if previous is not None and has_checkpoints(cfg.run_dir):
        try:
            old = Config.model_validate(yaml.safe_load(previous))
        except (ValueError, yaml.YAMLError):  # written by another version: the checkpoint decides
            old = cfg
        if old.model != cfg.model:
            changed = [f"model.{k}: {v} -> {getattr(cfg.model, k)}" for k, v in old.model
                       if getattr(cfg.model, k) != v]
            raise ConfigError(f"run.name={cfg.run.name}: {cfg.run_dir} holds checkpoints of another "
                              f"model ({'; '.join(changed)}); choose a new run.name to train this one")
        before = flat_params(old.model_dump(mode="json"))
        diff = [k for k, v in flat_params(cfg.model_dump(mode="json")).items() if before.get(k) != v]
        print(f"resuming run {cfg.run.name} from its latest checkpoint in {cfg.run_dir}"
              + (f"; changed since: {', '.join(diff)}" if diff else ""), flush=True)
    try:
        save_text(cfg.run_dir, "config.yaml", cfg.to_yaml())
    except OSError as e:
        raise ConfigError(f"checkpoint.storage_path={cfg.checkpoint.storage_path}: cannot write "
                          f"{cfg.run_dir}/config.yaml ({e}); give a writable local path or an "
                          "s3:// / gs:// URI") from None

    uri = cfg.mlflow.resolved_uri()
    try:
        experiment_id = ensure_experiment(uri, cfg.mlflow.experiment)
    except Exception as e:
        raise ConfigError(f"mlflow.tracking_uri={uri}: cannot use the tracking store "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    model = build_model(cfg.model, num_classes=classes)
    stats = model_stats(model, (3, cfg.data.crop_size, cfg.data.crop_size))
    print(f"{cfg.model.name}: {stats['params']:,} parameters, {stats['macs'] / 1e6:.1f}M MACs per image; "
          f"{rows['train']} train / {rows['val']} val images, {classes} classes; outputs in {cfg.run_dir}; "
          f"MLflow: {uri}", flush=True)
    return {"num_classes": classes, "train_rows": rows["train"], "val_rows": rows["val"],
            "stats": stats, "mlflow_uri": uri, "experiment_id": experiment_id}


def check_cluster(cfg: Config) -> None:
    """Refuse, instead of waiting forever, a job the cluster cannot hold: training's CPUs and GPUs,
    plus at least one CPU left for Ray Data's decoding (without it the input never arrives)."""
    import ray
    total = ray.cluster_resources()
    sc = cfg.scaling
    cpus, gpus = sc.num_workers * sc.cpus_per_worker, sc.num_workers * sc.gpus_per_worker
    have_cpus, have_gpus = total.get("CPU", 0), total.get("GPU", 0)
    if gpus > have_gpus:
        raise ConfigError(f"scaling.gpus_per_worker={sc.gpus_per_worker} x scaling.num_workers={sc.num_workers}: "
                          f"needs {gpus:g} GPUs, the cluster has {have_gpus:g}; lower them, or set "
                          "gpus_per_worker=0 to train on CPUs")
    if cpus + 1 > have_cpus:
        raise ConfigError(f"scaling.cpus_per_worker={sc.cpus_per_worker:g} x scaling.num_workers={sc.num_workers}: "
                          f"training takes {cpus:g} of the cluster's {have_cpus:g} CPUs and Ray Data needs at "
                          "least one more to decode; lower them or add nodes")


def start_ray(cfg: Config) -> None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it; `RAY_ADDRESS=auto` joins the one
    `ray start` made here); otherwise start Ray in this process with enough logical CPUs for the
    workers plus decoding (a laptop's two cores can host two 1-CPU workers and the decode tasks:
    they share the cores)."""
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if "RAY_AUTH_MODE" not in os.environ and Path("~/.ray/auth_token").expanduser().exists():
            os.environ["RAY_AUTH_MODE"] = "token"  # clusters from `ray start` (Ray 2.60) require the token
        host, _, port = address.rpartition(":")
        if "://" not in address and port.isdigit():  # Ray retries a dead address for minutes
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as e:
                raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or e}); "
                                  "unset it to start Ray here") from None
        ray.init(address=address, log_to_driver=True)
        return
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    init_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(need) + 2))


def init_local_ray(**options) -> None:
    """ray.init a new local instance whose processes ask their own dashboard's state API.

    Ray Train's placement-group cleaner looks the cluster up from the machine's Ray instances; with
    two on one machine (a test cluster beside a `ray start`) it raises "Found multiple active Ray
    instances", and a trial stopped by ASHA or a killed run then keeps its workers' CPUs. The
    processes ray.init starts inherit this environment, so naming the dashboard while it starts
    them pins them to this instance; afterwards the variable goes, lest this process's children
    (another cluster's `ray start`) inherit it too.
    """
    import ray
    port = free_port()
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 **options)
    finally:
        if before is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ingest(DataConfig):
    """How the datasets reach the workers: training split equally (every worker must take the same
    number of DDP steps), validation split unequally so that no image is dropped."""

    def __init__(self, deterministic: bool):
        with warnings.catch_warnings():  # Ray's own defaults trip its exclude_resources deprecation
            warnings.simplefilter("ignore")
            options = copy.deepcopy(DataConfig.default_ingest_options())
        options.preserve_order = deterministic
        super().__init__(execution_options=options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train calls this once per dataset.
        out = super().configure({k: v for k, v in datasets.items() if k != "val"}, world_size,
                                worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"]
            val.context.execution_options = self._resolve_execution_options("val")
            for i, split in enumerate(val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                out[i]["val"] = split
        return out


def fit(cfg: Config, callbacks: list = (), parent_run_id: str | None = None):
    """Train cfg on the Ray cluster (started here if there is none); returns Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    quiet_ray_data()
    info = preflight(cfg)
    start_ray(cfg)
    check_cluster(cfg)
    train_ds, val_ds, _ = build_datasets(cfg.data, cfg.run.seed)
    info["mlflow_run_id"] = open_run(cfg, info["mlflow_uri"], info["experiment_id"], info["stats"], parent_run_id)
    sc = cfg.scaling
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), **info},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": sc.cpus_per_worker,
                                                           **({"GPU": sc.gpus_per_worker}
                                                              if sc.gpus_per_worker else {})},
                                     placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=cfg.checkpoint.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_best,
                                               checkpoint_score_attribute="val_error",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # Train's per-report lines: its log files
            callbacks=list(callbacks)),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=Ingest(cfg.data.deterministic))
    client = mlflow_client(info["mlflow_uri"])
    try:
        result = trainer.fit()
        log_final(cfg, result, info["mlflow_uri"])
    except BaseException:
        # A sweep's trial leaves this to the sweep's driver: Tune stopping a trial (ASHA) kills its
        # TorchTrainer, and a FAILED written here raced with the driver's KILLED, and could land last.
        if parent_run_id is None:
            client.set_terminated(info["mlflow_run_id"], "FAILED")  # resumable: the same run.name continues it
        raise
    client.set_terminated(info["mlflow_run_id"], "FINISHED")
    return result


def quiet_ray_data() -> None:
    """One table row per epoch on the console: Ray Data's per-execution progress goes to its logs."""
    import logging

    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(argv, "Train a ResNet with DDP on Ray Train (see ray_config.yaml).")
    try:
        result = fit(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if result.checkpoint is None:
        return
    best = best_checkpoint(result)
    last = load_state(result.checkpoint)
    print(f"done: {last['epoch']} epochs; final val error {last['history'][-1]['val_error']:.2%}"
          + (f", best {best[1]['val_error']:.2%} (epoch {best[1]['epoch']}, {best[0].path})" if best else "")
          + f"; MLflow run {last['mlflow_run_id']}", flush=True)


if __name__ == "__main__":
    main()
