"""Train a ResNet with DDP on Ray Train:  python -m pipelines.train --config ray_config.yaml [key=value ...]

Reads top to bottom:
  fit (the driver): preflight, every mistake visible before a worker starts -> Ray -> TorchTrainer
      (workers, checkpoints, restarts) -> the best and final model into MLflow. main adds the
      closing summary.
  train_loop (each worker): build -> restore from the run's latest checkpoint -> epochs: train,
      validate, checkpoint + ray.train.report; rank 0 sends the table row to the console. Each
      worker reads its own rows of the shards (pipelines.plan) through Ray Data pipelines of its own.
  LogEpochs (on Ray Train's controller, beside the driver): each epoch into MLflow once its
      checkpoint is registered, so an attempt a failure discarded never reaches MLflow.

The same run.name resumes: Ray Train finds the run's checkpoints under checkpoint.storage_path,
the loop continues after the last finished epoch, and the MLflow run continues with it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from ray.train import UserCallback
from torch import nn

from pipelines import checkpoint, plan
from pipelines.checkpoint import (StorageFull, best_checkpoint, check_space, checkpoint_name, discarded_checkpoints,
                                  epochs_done, final_state, load_state, read_text, remove_checkpoints,
                                  save_text, storage_full_at, tensor_bytes)
from pipelines.config import Config, ConfigError, SetupError, cli_errors, parse_cli
from pipelines.console import Console, WorkerConsole, header, summary, table_row
from pipelines.data import planned_dataset, shards_dir
from pipelines.feed import epoch_feed
from pipelines.profiling import StepProfile
from pipelines.recipe import (NoHostSync, Numerics, Schedule, all_gather, all_reduce, load_optimizer, make_optimizer,
                              numerics, step_forward, train_step, unwrap, validation_counts)
from pipelines.ray_internals import worker_exceptions
from pipelines.runtime import check_cluster, driver_settings, start_ray
from pipelines.shards import ShardError, check_shards, fs_and_path, load_manifest, storage_error, storage_hint
from pipelines.tracking import (EpochLog, Gauges, SystemMetricsLog, SystemSampler, ensure_experiment, flat_params,
                                log_lineage, log_models, mlflow_client, open_run, quiet_mlflow, ui_command)
from resnet_models import build_model, model_stats


# ---------------------------------------------------------------------------------------------
# The worker

@dataclass
class Job:
    """One worker's training: what it builds once, and what a checkpoint carries from epoch to epoch."""
    cfg: Config
    info: dict                   # from preflight: classes, rows per split, the MLflow run
    rank: int
    world: int
    device: torch.device
    numerics: Numerics
    model: nn.Module             # DDP-wrapped on the device
    forward: nn.Module           # the model, or its torch.compile
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    attempt: str = ""            # when this worker group started: names its checkpoints
    checkpoint_bytes: int = 0    # rank 0's last checkpoint, to check the storage has room for the next
    epoch: int = 0               # epochs done
    step: int = 0                # steps done, all epochs
    history: list = field(default_factory=list)
    partial: dict | None = None  # the next epoch, when a checkpoint within it was resumed (train_epoch)
    preemption: tuple | None = None  # the preemption notice already checkpointed for
    upcoming: "Upcoming | None" = None  # the next epoch's batches, started before this one's checkpoint
    check: type = contextlib.nullcontext  # what each step runs in: NoHostSync with RAY_RESNET_CHECK_SYNCS=1

    @property
    def net(self) -> nn.Module:
        return unwrap(self.model)

    def state(self) -> dict:
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "warming": self.schedule.warming, "history": self.history,
                "mlflow_run_id": self.info["mlflow_run_id"], "model_name": self.cfg.model.name,
                "num_classes": self.info["num_classes"], "config": self.cfg.model_dump(mode="json"),
                "partial": self.partial}


def build(cfg: Config, info: dict) -> Job:
    import ray.train
    import ray.train.torch
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    num = numerics(cfg, device)
    torch.manual_seed(cfg.run.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's too)
    model = build_model(cfg.model, num_classes=info["num_classes"])
    if cfg.scaling.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if num.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # on the device; DDP (NCCL on GPUs, gloo on CPUs)
    opt = make_optimizer(model, cfg.optim, cfg.data.batch_size)
    steps_per_epoch = plan.steps_per_epoch(info["train_rows"], cfg.data.batch_size)
    return Job(cfg, info, rank, world, device, num, model, step_forward(model, num, device), opt,
               torch.amp.GradScaler(device.type, enabled=num.amp == torch.float16), Schedule(opt, cfg, steps_per_epoch),
               check=NoHostSync if info.get("check_syncs") and not unchecked_syncs(cfg, num, world)
               else contextlib.nullcontext)


def unchecked_syncs(cfg: Config, num: Numerics, world: int) -> str:
    """Why RAY_RESNET_CHECK_SYNCS=1 cannot check this run's steps: ops in them that sync by design
    ("" when it can)."""
    if num.amp == torch.float16:
        return "fp16's loss scaling reads back at each step whether the gradients overflowed"
    if cfg.scaling.sync_batchnorm and world > 1:  # with one worker it is plain BatchNorm
        return "torch's SyncBatchNorm indexes with a boolean mask in every BatchNorm layer"
    return ""


def restore(job: Job, ckpt) -> None:
    """Continue from a Ray Train checkpoint: weights, optimizer, schedule, history, and this rank's
    random streams (when the checkpoint has them: the same world size)."""
    with ckpt.as_directory() as d:
        state = load_state(d, need=checkpoint.STATE_KEYS)
        checkpoint.restore_rng(d, job.rank)
    job.net.load_state_dict(state["model"])
    load_optimizer(job.opt, state["optimizer"])
    if state["scaler"]:  # a disabled scaler (no fp16) saved none: an fp16 resume starts scaling afresh
        job.scaler.load_state_dict(state["scaler"])
    job.epoch, job.step, job.schedule.warming, job.history = (state[k] for k in ("epoch", "step", "warming", "history"))
    job.partial = state.get("partial")


def planned_batches(job: Job, units: list, rows: np.ndarray, train: bool, batch_size: int, epoch: int):
    """These rows of a split (pipelines.plan), read by a Ray Data pipeline of this worker's own, as
    batches on the device prepared ahead of the step (pipelines.feed)."""
    cfg = job.cfg
    source = planned_dataset(cfg.data, job.info["shards_fs"], units, plan.read_runs(units, rows),
                             encoded=cfg.decode_on_device, train=train)
    return epoch_feed(source, cfg, epoch, job.rank, job.device, job.numerics.channels_last, train, batch_size)


def training_batches(job: Job, epoch: int, rows: np.ndarray):
    """This worker's rows of the epoch, in this rank's share of each global batch."""
    batch = plan.rank_batches(job.cfg.data.batch_size, job.world)[job.rank]
    return planned_batches(job, job.info["units"], rows, train=True, batch_size=batch, epoch=epoch)


@dataclass
class Upcoming:
    """The next epoch's first batches, on their way while this epoch validates and checkpoints: a
    new Ray Data pipeline takes a while to deliver its first batch, which the GPU would otherwise
    wait for at the start of every epoch (docs/gpu.md)."""
    epoch: int
    rows: np.ndarray
    batches: object

    @staticmethod
    def during_validation(cfg: Config) -> bool:
        """Start before validating? Only when images are decoded on the device: then the next
        epoch's Ray Data tasks only read and end. Decoding tasks that Ray Data holds back until their
        batches are taken would keep their CPUs, which validation's own tasks may need; those start
        after validation, while the checkpoint is written."""
        return cfg.decode_on_device

    @classmethod
    def start(cls, job: Job) -> "Upcoming | None":
        if job.epoch >= job.cfg.schedule.epochs:
            return None
        epoch = job.epoch + 1
        rows = plan.worker_rows(job.info["units"], job.cfg.run.seed, epoch, job.cfg.data.batch_size, job.world,
                                job.rank)
        return cls(epoch, rows, training_batches(job, epoch, rows))

    def take(self, epoch: int, rows: np.ndarray):
        """Its batches if they are that epoch's rows; else None (and it stops)."""
        if self.epoch == epoch and np.array_equal(self.rows, rows):
            return self.batches
        self.batches.close()
        return None


# Steps between two asks whether a node of the run is being preempted (a collective: every worker
# asks at the same steps), aimed at this many seconds apart.
PREEMPTION_CHECK_S = 2.0
# What a checkpoint within an epoch reports to Ray Train as its validation error: worse than any
# (errors are at most 1), so that checkpoint.keep_best drops it first. Not NaN or inf: Ray's
# checkpoint list stores them as null, and a resumed run then fails comparing scores.
PARTIAL_VAL_ERROR = 2.0


class Epoch:
    """The epoch in progress on this worker: its rows (pipelines.plan), what it has trained, and when
    to checkpoint within it. A resumed checkpoint taken within it (job.partial) gives the steps and
    rows already done and their sums."""

    def __init__(self, job: Job, say: WorkerConsole):
        from ray.train.collective import broadcast_from_rank_zero
        n, b = job.info["train_rows"], job.cfg.data.batch_size
        self.steps = plan.steps_per_epoch(n, b)
        p = job.partial
        if p and (p.get("batch"), p.get("rows")) != (b, n):
            say.line(f"the checkpoint within epoch {job.epoch + 1} was written with data.batch_size="
                     f"{p.get('batch')} over {p.get('rows')} images, now {b} over {n}: epoch {job.epoch + 1} "
                     "starts over")
            p = None
        p = p or {"steps": 0, "done": None, "sums": [0.0] * 6}
        self.start, self.carried = p["steps"], p["sums"]
        self.done = plan.unpack(p["done"].numpy(), n) if p["done"] is not None else np.zeros(n, bool)
        self.epoch = job.epoch + 1  # the one in progress
        self.rows = plan.worker_rows(job.info["units"], job.cfg.run.seed, self.epoch, b, job.world, job.rank,
                                     self.done, self.start)
        self.batch = plan.rank_batches(b, job.world)[job.rank]
        # Steps between two asks whether a node is being preempted: rank 0's (a collective must be
        # asked at the same steps by every worker), from its previous epoch's time a step.
        last = job.history[-1] if job.history else None
        step_s = last["epoch_time_s"] / max(self.steps, 1) if last else 0.0
        self.check_every = broadcast_from_rank_zero(max(1, round(PREEMPTION_CHECK_S / step_s)) if step_s else 10)
        self.last_save = time.monotonic()

    def due(self, job: Job, step: int, say: WorkerConsole) -> bool:
        """Checkpoint after this step (steps done this epoch)? The same answer on every worker."""
        import ray.train
        every = job.cfg.checkpoint
        if step >= self.steps:
            return False  # the epoch's end checkpoints anyway
        due = bool(every.every_steps) and step % every.every_steps == 0
        if step % self.check_every:
            return due
        info = ray.train.get_preemption_info()
        notice = None if info is None else (info.deadline_ms, tuple(sorted(info.preempted_node_ids)))
        if notice is not None and notice != job.preemption:  # a new notice: checkpoint once for it
            job.preemption = notice
            left = (f"{(info.deadline_ms / 1000 - time.time()):.0f} s before its deadline" if info.deadline_ms
                    else "no deadline")
            say.line(f"node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} being preempted ({left}): "
                     f"checkpoint at step {step:,} of {self.steps:,} of epoch {self.epoch}")
            due = True
        if every.every_minutes:
            from ray.train.collective import broadcast_from_rank_zero
            due = broadcast_from_rank_zero(due or time.monotonic() - self.last_save >= every.every_minutes * 60)
        return due


def train_epoch(job: Job, say: WorkerConsole) -> tuple[dict, dict]:
    """One epoch of steps, from where a resumed checkpoint left it: (the epoch's training metrics over
    all workers, this worker's for its gauges). Counts stay on the device until the epoch ends or a
    checkpoint within it: no step waits for the GPU to report a number."""
    cfg = job.cfg
    ep = Epoch(job, say)
    job.model.train()
    t0, waited, skipped = time.perf_counter(), 0.0, 0
    sums = torch.zeros(3, dtype=torch.float64, device=job.device)  # loss sum, wrong, images
    upcoming, job.upcoming = job.upcoming, None
    batches = (upcoming and upcoming.take(ep.epoch, ep.rows)) or training_batches(job, ep.epoch, ep.rows)
    audit = RowAudit(job, ep)
    share = cfg.data.batch_size / job.world
    say.start_epoch(ep.epoch, (ep.steps - ep.start) * cfg.data.batch_size)
    profile = StepProfile(job, ep, say)
    try:
        for s in range(ep.start + 1, ep.steps + 1):
            tw = time.perf_counter()
            b = next(batches, None)
            waited += time.perf_counter() - tw
            if b is None:  # each worker was given rows for exactly its steps
                raise RuntimeError(f"rank {job.rank}: its planned rows ended at step {s} of {ep.steps} of epoch "
                                   f"{ep.epoch}")
            # Nothing in a step waits for the device (NoHostSync), from the third step: DDP rebuilds its
            # gradient buckets at the second, with copies between host and device.
            with job.check() if s - ep.start > 2 else contextlib.nullcontext():
                skipped += b.skipped
                ep.done[b.idx] = True
                audit.step(ep.epoch, s, b.idx, job.opt.param_groups[0]["lr"])
                job.schedule.set(job.step)
                logits, loss = train_step(job.forward, job.opt, job.scaler, b.x, b.y, cfg, job.numerics.amp, share,
                                          cfg.scaling.max_worker_batch, getattr(job.model, "no_sync", None))
                job.step += 1
                ok = b.y >= 0  # all but a batch's one kept placeholder
                n = ok.sum()
                sums += torch.stack([loss.float() * n, ((logits.argmax(1) != b.y) & ok).sum(), n]).double()
                say.step((s - ep.start) * cfg.data.batch_size, waited)
            profile.step()
            if ep.due(job, s, say):
                totals = epoch_totals(job, ep, sums, skipped, time.perf_counter() - t0, waited)
                job.partial = {"steps": s, "done": torch.from_numpy(plan.pack(ep.done)), "sums": totals,
                               "workers": job.world, "batch": cfg.data.batch_size, "rows": job.info["train_rows"]}
                save_and_report(job, {"epoch": ep.epoch, "step": s, "partial": True, "val_error": PARTIAL_VAL_ERROR})
                ep.last_save = time.monotonic()
    finally:
        profile.close()
        batches.close()
        audit.close()
    job.epoch += 1
    job.partial = None
    loss_sum, wrong, seen, skipped, train_time, wait_s = epoch_totals(job, ep, sums, skipped,
                                                                        time.perf_counter() - t0, waited)
    job.schedule.end_epoch(wrong / max(seen, 1))
    row = {"epoch": job.epoch, "lr": job.opt.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
           "train_error": wrong / max(seen, 1), "images_per_s": seen / train_time, "data_wait": wait_s / train_time,
           "train_skipped": int(skipped), "workers": job.world, "epoch_time_s": train_time,
           # rows the manifest lists that no step trained: the epoch's last rows short of a global batch
           "train_dropped": job.info["train_rows"] - int(seen) - int(skipped)}
    local = sums.cpu()
    spent = time.perf_counter() - t0
    mine = {"images_per_s": local[2].item() / spent, "train_loss": local[0].item() / max(local[2].item(), 1),
            "data_wait": waited / spent}
    return row, mine


class RowAudit:
    """With RAY_RESNET_AUDIT_ROWS=DIR in the driver's environment: every step's rows (global numbers)
    and learning rate, one JSON line each, in DIR/<attempt>-rank<r>.jsonl on the worker's node; a
    start line gives the attempt's workers and the position it resumed from. What proves each
    image trained once per epoch (docs/elastic.md); nothing without it."""

    def __init__(self, job: Job, ep: "Epoch"):
        self.file = None
        if where := job.info.get("audit_rows"):
            os.makedirs(where, exist_ok=True)
            self.file = open(f"{where}/{job.attempt}-rank{job.rank}.jsonl", "a")
            self.write({"start": [ep.epoch, ep.start], "world": job.world, "rank": job.rank,
                        "batch": ep.batch})

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def step(self, epoch: int, step: int, idx, lr: float) -> None:
        if self.file:
            self.write({"epoch": epoch, "step": step, "lr": lr, "rows": [int(i) for i in idx]})

    def close(self) -> None:
        if self.file:
            self.file.close()


def epoch_totals(job: Job, ep: Epoch, sums: torch.Tensor, skipped: int, spent: float, waited: float) -> list[float]:
    """[loss sum, wrong, images, skipped, seconds, seconds waited for input] of the epoch so far, over
    all workers and every start of it, and the rows done so far into ep.done (a collective)."""
    local = torch.cat([sums.cpu(), torch.tensor([skipped], dtype=torch.float64)])
    totals = all_reduce(local).tolist()
    slowest = all_reduce(torch.tensor([spent], dtype=torch.float64), op="max").item()
    wait_share = all_reduce(torch.tensor([waited / max(spent, 1e-9)], dtype=torch.float64)).item() / job.world
    ep.done[:] = all_reduce(torch.from_numpy(ep.done.view(np.uint8)), op="max").numpy().view(bool)
    return [a + b for a, b in zip(totals + [slowest, wait_share * slowest], ep.carried)]


def validate(job: Job) -> dict:
    """Every validation image once over the workers: each reads its share (plan.validation_rows)
    through a Ray Data pipeline of its own, as it reads its training rows."""
    cfg, skipped = job.cfg, 0
    rows = plan.validation_rows(job.info["val_rows"], job.world, job.rank)

    def batches():
        nonlocal skipped
        whole = cfg.data.batch_size
        size = min(-(-whole // job.world), cfg.scaling.max_worker_batch or whole)
        for b in planned_batches(job, job.info["val_units"], rows, train=False, batch_size=size, epoch=job.epoch):
            skipped += b.skipped
            if len(b.y):
                yield b.x, b.y

    counts = validation_counts(job.net, batches(), job.device, job.numerics, check=job.check)
    top1, top5, seen, skipped = all_reduce(torch.cat([counts, torch.tensor([skipped], dtype=torch.float64)])).tolist()
    return {"val_error": 1 - top1 / max(seen, 1), "val_top5_error": 1 - top5 / max(seen, 1),
            "val_skipped": int(skipped), "val_dropped": job.info["val_rows"] - int(seen) - int(skipped)}


def save_and_report(job: Job, row: dict) -> None:
    """Every worker writes its random streams, rank 0 the rest, into a local folder that
    ray.train.report copies to the run's storage; Ray Train registers the checkpoint once all have
    reported. A full disk (here or there) leaves no partial checkpoint behind, and says where."""
    import ray.train
    name = checkpoint_name(job.epoch, job.attempt, job.partial["steps"] if job.partial else 0)
    with tempfile.TemporaryDirectory() as d:
        with storage_full_at(tempfile.gettempdir()):
            checkpoint.save(d, job.rank, checkpoint.rng_state(), job.state() if job.rank == 0 else None)
        job.checkpoint_bytes = sum(f.stat().st_size for f in os.scandir(d))
        with storage_full_at(job.cfg.run_dir, partial=name):
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)


def train_loop(config: dict) -> None:
    """One Ray Train worker, from the run's latest checkpoint when it has one."""
    import ray
    import ray.train
    cfg = Config.model_validate(config["cfg"])
    job = build(cfg, config)
    if ckpt := ray.train.get_checkpoint():
        restore(job, ckpt)
    say = WorkerConsole(config.get("console"), enabled=job.rank == 0)
    gauges = Gauges(cfg.run.name, job.rank)
    workers = all_gather((ray.get_runtime_context().get_node_id(), time.strftime("%Y-%m-%d_%H-%M-%S")))
    nodes, job.attempt = len({node for node, _ in workers}), workers[0][1]
    unchecked = unchecked_syncs(cfg, job.numerics, job.world) if config.get("check_syncs") else ""
    decoding = f"decoded on the {job.device.type}" if cfg.decode_on_device else "decoded by Ray Data on CPUs"
    per_worker = sorted(set(plan.rank_batches(cfg.data.batch_size, job.world)), reverse=True)
    limit = cfg.scaling.max_worker_batch
    micro = f", in micro-batches of at most {limit}" if limit and per_worker[0] > limit else ""
    workers_now = f"{job.world} worker{'s' if job.world > 1 else ''}"
    say.line(f"{cfg.run.name}: {cfg.model.name}: {workers_now} on {nodes} node(s), {job.device.type}"
             + (f", compiled ({job.numerics.compile})" if job.numerics.compile else "")
             + (", host syncs checked" + (" (so it runs eagerly)" if job.numerics.compile else "")
                if job.check is NoHostSync else "")
             + (f", host syncs not checked ({unchecked})" if unchecked else "")
             + f"; images {decoding}; global batch {cfg.data.batch_size} "
             + f"({' or '.join(map(str, per_worker))} a worker{micro})"
             + (f"; epochs {job.epoch + 1}..{cfg.schedule.epochs}"
                + (" (resumed)" if job.epoch or job.partial else "")
                if job.epoch < cfg.schedule.epochs else ""))  # else the next line says it has trained them
    if job.partial and job.epoch < cfg.schedule.epochs:
        p = job.partial
        say.line(f"continuing epoch {job.epoch + 1} from step {p['steps']:,} of "
                 f"{plan.steps_per_epoch(config['train_rows'], cfg.data.batch_size):,} with {workers_now}"
                 + (f" (its checkpoint was written by {p['workers']})" if p["workers"] != job.world else "")
                 + ": the epoch's remaining images, each once")
    if job.epoch >= cfg.schedule.epochs and job.history:
        say.line(f"run {cfg.run.name} has trained its {job.epoch} epoch{'s' if job.epoch != 1 else ''} already: "
                 "raise schedule.epochs to train on, or choose a new run.name")
        # Report the last epoch again: a sweep killed after this trial finished but before Tune
        # recorded it runs the trial again, and Tune needs its result.
        ray.train.report(job.history[-1])
        return
    say.line(header())
    job.checkpoint_bytes = tensor_bytes(job.state()) if job.rank == 0 else 0
    with SystemSampler(cfg.mlflow.system_metrics_s if job.rank == 0 else 0, gpus=job.device.type == "cuda",
                       send=lambda sample: say.send("system", {**sample, "run_id": config["mlflow_run_id"]})):
        try:
            while job.epoch < cfg.schedule.epochs:
                if job.rank == 0:  # a full disk found now, not after an epoch of training
                    check_space(cfg.run_dir, job.checkpoint_bytes)
                row, mine = train_epoch(job, say)
                t0 = time.perf_counter()
                if Upcoming.during_validation(cfg):
                    job.upcoming = Upcoming.start(job)
                row.update(validate(job))
                job.upcoming = job.upcoming or Upcoming.start(job)
                row["epoch_time_s"] += time.perf_counter() - t0
                job.history.append(row)
                save_and_report(job, row)
                gauges.set(**mine, val_error=row["val_error"])
                say.line(table_row(row))
        finally:
            if job.upcoming:
                job.upcoming.batches.close()


class LogEpochs(UserCallback):
    """Each epoch's row into the run's MLflow run (step = epoch) once Ray Train has registered the
    epoch's checkpoint: it runs on Ray Train's controller right after its checkpoint manager. A
    worker lost after writing its checkpoint but before Ray registered it makes Ray retrain the
    epoch; that first attempt is never logged, and its checkpoint is deleted here when the retrained
    epoch is registered. A row MLflow does not take now is logged by fit at the end. Checkpoints
    within an epoch are not logged; a failed worker is said on the console."""

    def __init__(self, uri: str, run_id: str, run_dir, console: dict | None = None, settings: dict | None = None):
        self.uri, self.run_id, self.run_dir, self.log = uri, run_id, run_dir, None  # run_dir: fs_and_path's
        self.console, self.last = console, "its latest checkpoint"
        self.settings = settings or {}  # the driver's (runtime.driver_settings): MLflow's token, proxies

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is None:
            return
        row = metrics[0]
        name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        remove_checkpoints(self.run_dir, discarded_checkpoints(self.run_dir, name))
        self.last = (f"step {row['step']:,} of epoch {row['epoch']}" if row.get("partial")
                     else f"the end of epoch {row['epoch']}")
        if row.get("partial"):
            return
        try:
            if self.log is None:
                os.environ.update(self.settings)  # the controller's process has its Ray node's environment
                self.log = EpochLog(self.uri, self.run_id)
            self.log.log([row])
        except Exception as e:  # a tracking server away for a moment must not stop the training
            logging.getLogger(__name__).warning("MLflow did not take epoch %s (%s); it is logged at the end",
                                                row["epoch"], e)

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, e in sorted(worker_exceptions.items()):
            what = (str(e).strip().splitlines() or [""])[0][:200]
            try:  # an exception here would end the run
                WorkerConsole(self.console).line(f"worker {rank} failed ({type(e).__name__}: {what}); unless "
                                                 f"run.max_failures is spent, Ray Train goes on from {self.last} "
                                                 "with the workers the cluster has")
            except Exception as err:  # noqa: BLE001
                logging.getLogger(__name__).warning("cannot say that worker %s failed: %s", rank, err)


# ---------------------------------------------------------------------------------------------
# The driver

def preflight(cfg: Config) -> dict:
    """Every mistake we can see before a worker starts: shards, classes, storage, a resumed run
    of another model, the tracking store. Returns what the workers need to know."""
    try:
        directory = shards_dir(cfg.data)
        manifest = load_manifest(directory)
        # every shard there and whole: found now, not after Ray starts
        shards = {split: check_shards(directory, split, verify="size") for split in ("train", "val")}
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    classes = len(manifest["classes"])
    if cfg.data.num_classes is not None and cfg.data.num_classes != classes:
        raise ConfigError(f"data.num_classes={cfg.data.num_classes}: {directory}/manifest.json lists "
                          f"{classes} classes; set data.num_classes={classes} or null")
    rows = {split: manifest["splits"][split]["rows"] for split in ("train", "val")}
    if rows["train"] < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: {directory} has {rows['train']} training "
                          "images, fewer than one global batch; lower data.batch_size")

    def unwritable(e: OSError) -> ConfigError:
        return ConfigError(f"checkpoint.storage_path={cfg.checkpoint.storage_path}: cannot write "
                           f"{cfg.run_dir}/config.yaml ({storage_error(e)}); give a writable local path or an "
                           f"s3:// / gs:// URI{storage_hint(cfg.run_dir)}")

    fs, path = fs_and_path(cfg.run_dir)
    try:  # storage that refuses or does not answer: said after one call's retries, not after each call's
        fs.get_file_info(path)
    except OSError as e:
        raise unwritable(e) from None
    previous = read_text(cfg.run_dir, "config.yaml")
    done_before = epochs_done(cfg.run_dir)
    if previous is not None and done_before is not None:
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
        raise unwritable(e) from None

    uri = cfg.mlflow.resolved_uri()
    if not cfg.run.verbose:
        quiet_mlflow()
    try:
        experiment_id = ensure_experiment(uri, cfg.mlflow.experiment, cfg.mlflow.artifact_location)
    except (ConfigError, SetupError):
        raise
    except Exception as e:  # a server that does not answer, a store another MLflow version wrote
        raise SetupError(f"mlflow.tracking_uri={uri}: cannot use the tracking store "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    model = build_model(cfg.model, num_classes=classes)
    stats = model_stats(model, (3, cfg.data.crop_size, cfg.data.crop_size))
    print(f"{cfg.model.name}: {stats['params']:,} parameters, {stats['macs'] / 1e6:.1f}M MACs per image; "
          f"{rows['train']} train / {rows['val']} val images, {classes} classes; outputs in {cfg.run_dir}; "
          f"MLflow: {uri}", flush=True)
    sc = cfg.scaling
    device = f"{sc.gpus_per_worker:g} GPU each" if sc.gpus_per_worker else "CPUs"
    workers = f"{sc.min_workers} to {sc.max_workers}" if sc.elastic else sc.num_workers
    # folders the workers write to, whose working folder is not this one
    audit, profile = (os.environ.get(f"RAY_RESNET_{key}") for key in ("AUDIT_ROWS", "PROFILE"))
    return {"num_classes": classes, "train_rows": rows["train"], "val_rows": rows["val"],
            "epochs_before": done_before or 0,
            "stats": stats, "mlflow_uri": uri, "experiment_id": experiment_id, "shards": directory,
            "manifest": manifest, "units": plan.read_units(shards["train"]),
            "val_units": plan.read_units(shards["val"]), "shards_fs": fs_and_path(directory)[0],
            "audit_rows": audit and os.path.abspath(audit), "profile": profile and os.path.abspath(profile),
            "check_syncs": os.environ.get("RAY_RESNET_CHECK_SYNCS", "") not in ("", "0"),
            "description": f"{cfg.model.name} ({stats['params']:,} parameters) on {directory}: {rows['train']:,} "
                           f"training / {rows['val']:,} validation images, {classes} classes; "
                           f"{cfg.schedule.epochs} epochs, {workers} workers ({device})"}


def fit(cfg: Config, callbacks: list = (), parent_run_id: str | None = None, console: dict | None = None,
        started: dict | None = None):
    """Train cfg on the Ray cluster (started here if there is none); returns Ray Train's Result.
    Rank 0's lines go to console (a sweep's: Console.channel()), else to a Console of this run's.
    started, if given, is filled with what the closing summary needs: epochs_before, the epochs the
    run's checkpoints had finished before this start."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    info = preflight(cfg)
    if started is not None:
        started["epochs_before"] = info["epochs_before"]
    ray_line = start_ray(cfg)
    if ray_line:
        print(ray_line, flush=True)
    check_cluster(cfg)
    info["mlflow_run_id"] = open_run(cfg, info["mlflow_uri"], info["experiment_id"], info["stats"], parent_run_id)
    # the manifest and description stay here: the workers need neither
    log_lineage(info["mlflow_uri"], info["mlflow_run_id"], info["shards"], info.pop("manifest"),
                info.pop("description"))
    sc = cfg.scaling
    client = mlflow_client(info["mlflow_uri"])
    # One filesystem for the run's storage, built here: Ray Train's controller and workers and this
    # callback use it, with this process's settings (fs_and_path), whatever their environment holds.
    storage_fs, storage_path = fs_and_path(cfg.checkpoint.storage_path)
    with contextlib.ExitStack() as stack:
        if console is None:  # this run's own, with its system metrics (a sweep's trials: the sweep's)
            system = stack.enter_context(SystemMetricsLog(info["mlflow_uri"]))
            console = stack.enter_context(Console(cfg.run.progress_s, handlers={"system": system.log})).channel()
        log_epochs = LogEpochs(info["mlflow_uri"], info["mlflow_run_id"], fs_and_path(cfg.run_dir), console,
                               driver_settings())
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), **info, "console": console},
            scaling_config=ScalingConfig(num_workers=tuple(sc.num_workers) if sc.elastic else sc.num_workers,
                                         elastic_resize_monitor_interval_s=sc.resize_interval_s,
                                         use_gpu=sc.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": sc.cpus_per_worker,
                                                               **({"GPU": sc.gpus_per_worker}
                                                                  if sc.gpus_per_worker else {})},
                                         placement_strategy=sc.placement_strategy),
            run_config=RunConfig(
                name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_best,
                                                   checkpoint_score_attribute="val_error",
                                                   checkpoint_score_order="min"),
                # a node drained for preemption before it goes costs no max_failures (Ray's own budget, unlimited)
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                logging_config=LoggingConfig(log_level="WARNING"),  # Train's per-report lines: its log files
                callbacks=[log_epochs, *callbacks]))  # no datasets: each worker reads its own rows (plan)
        try:
            result = storage_full_said(trainer.fit)
            if result.checkpoint is not None:
                latest = load_state(result.checkpoint)
                EpochLog(info["mlflow_uri"], info["mlflow_run_id"]).log(latest["history"])  # any LogEpochs missed
                final = final_state(result, latest)
                if final is not latest:
                    print(f"final_model: epoch {final['epoch']}'s checkpoint, the newest epoch end kept (the "
                          f"latest was taken within epoch {latest['epoch'] + 1})", flush=True)
                best = best_checkpoint(result)
                log_models(cfg, info["mlflow_uri"], final, load_state(best[0]) if best else final)
        except BaseException:
            # A sweep's trial leaves this to the sweep's driver: Tune stopping a trial (ASHA) kills its
            # TorchTrainer, and a FAILED written here raced with the driver's KILLED, and could land last.
            if parent_run_id is None:
                client.set_terminated(info["mlflow_run_id"], "FAILED")  # resumable: the same run.name continues it
            raise
    client.set_terminated(info["mlflow_run_id"], "FINISHED")
    return result


def storage_full_said(run):
    """run(), with a worker's StorageFull as one line (SetupError) instead of Ray's report of every worker."""
    from ray.train import TrainingFailedError
    try:
        return run()
    except TrainingFailedError as e:
        full = [w for w in worker_exceptions(e) if isinstance(w, StorageFull)]
        if full:
            raise SetupError(str(full[0])) from None
        raise


def closing_summary(cfg: Config, result, seconds: float, epochs_before: int = 0) -> str:
    last = load_state(result.checkpoint)
    best = best_checkpoint(result)
    return summary(epochs=last["epoch"], before=epochs_before, seconds=seconds,
                   final_error=last["history"][-1]["val_error"],
                   best=(best[1]["val_error"], best[1]["epoch"], best[0].path.rsplit("/", 1)[-1]) if best else None,
                   run_dir=cfg.run_dir, run_name=cfg.run.name, mlflow_run_id=last["mlflow_run_id"],
                   experiment=cfg.mlflow.experiment, open_command=ui_command(cfg.mlflow.resolved_uri()))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(argv, "Train a ResNet with DDP on Ray Train (see ray_config.yaml).",
                    prog="python -m pipelines.train")
    t0, started = time.perf_counter(), {}
    with cli_errors():
        result = fit(cfg, started=started)
    if result.checkpoint is not None:
        print(closing_summary(cfg, result, time.perf_counter() - t0, started["epochs_before"]), flush=True)


if __name__ == "__main__":
    main()
