"""The training recipe, torch only (no Ray): tests drive these directly.

    opt = make_optimizer(model, cfg.optim, cfg.data.batch_size)      # SGD, lr scaled to the batch
    opt.param_groups[i]["lr"] = peak * lr_factor(step, steps_per_epoch, cfg.schedule)
    logits, loss = train_step(model, opt, scaler, x, y, cfg, numerics.amp)
    counts = validation_counts(model, batches, to_device, numerics)   # [top-1 hits, top-5 hits, images]
    total = all_reduce(counts)                                        # summed over the DDP workers

The paper's recipe (He et al. 2015, Sec. 3.4 and 4.2) is the config's default; docs/training.md
says what each key changes.
"""
from __future__ import annotations

import contextlib
import math
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.config import Config, OptimSection, ScheduleSection


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


def load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """A checkpoint's optimizer state into opt, keeping opt's kernels: torch's load_state_dict also
    takes the saved groups' fused and foreach flags, so a run checkpointed on CPUs and resumed on
    GPUs would step unfused."""
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(saved)
    for group, flags in zip(opt.param_groups, kernels):
        group.update(flags)


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


class Schedule:
    """Sets the optimizer's learning rate before each step: the peak (scaled to the global batch)
    times lr_factor, or, in the ResNet-110 recipe, a small constant lr until the training error
    first drops below warmup_until_error (He et al. 2015, Sec. 4.2)."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
        self.opt, self.s, self.steps_per_epoch = opt, cfg.schedule, steps_per_epoch
        self.peak = [g["lr"] for g in opt.param_groups]
        self.warmup_lr = (self.s.warmup_lr or 0) * cfg.data.batch_size / cfg.optim.lr_batch  # given at lr_batch
        self.warming = self.s.warmup_lr is not None

    def set(self, step: int) -> None:
        for g, p in zip(self.opt.param_groups, self.peak):
            g["lr"] = self.warmup_lr if self.warming else p * lr_factor(step, self.steps_per_epoch, self.s)

    def end_epoch(self, train_error: float) -> None:
        if self.warming and train_error < self.s.warmup_until_error:
            self.warming = False


@dataclass(frozen=True)
class Numerics:
    """How a device computes: the autocast dtype (None: fp32), the memory layout, and the
    torch.compile mode (None: eager)."""
    amp: torch.dtype | None
    channels_last: bool
    compile: str | None = None


def numerics(cfg: Config, device: torch.device) -> Numerics:
    """bf16 autocast, NHWC (channels_last) and torch.compile pay off on GPUs (docs/gpu.md); on CPUs
    fp32, NCHW and eager, unless the config says."""
    gpu = device.type == "cuda"
    sc = cfg.scaling
    amp = {"auto": torch.bfloat16 if gpu else None, "off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[sc.amp]
    compile = {"auto": "default" if gpu else None, "on": "default", "off": None}.get(sc.compile, sc.compile)
    return Numerics(amp, {"auto": gpu, "on": True, "off": False}[sc.channels_last], compile)


def step_forward(model: nn.Module, num: Numerics, device: torch.device) -> nn.Module:
    """What the training step calls: the model, or its torch.compile in num's mode. dynamic=False: a
    batch of another size (micro-batches of two sizes; rows skipped, rare since the shard writer
    decodes every image) compiles a graph of its own, rather than one for any batch size that every
    later step would run. On GPUs cuDNN times its convolution algorithms once per shape and keeps
    the fastest (the step's shapes are fixed)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.compile(model, mode=num.compile, dynamic=False) if num.compile else model


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, cfg: Config, amp: torch.dtype | None, share: float | None = None,
               micro: int | None = None, no_sync=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward (DDP averages the gradients over workers), update: (logits, mean loss).

    share: the worker's nominal rows of the global batch (batch / workers). Its loss is its rows'
    sum divided by share, so DDP's average over workers is the mean over the global batch even when
    workers take unequal rows (pipelines.plan.rank_batches). None: the mean over this batch.
    micro: at most this many rows through the model at once; a larger batch goes through in equal
    micro-batches whose gradients add up before the one update (no_sync: the DDP module's, so that
    only the last exchanges gradients). BatchNorm's statistics are then per micro-batch.
    A row labelled -1 (the placeholder of an undecodable image, data.bad_records=skip, which the
    loop keeps only when a batch holds nothing else) counts for nothing in the loss: such a batch
    steps with a zero loss, since DDP needs every worker's step."""
    valid = (y >= 0).sum().clamp(min=1)
    divisor = valid if share is None else share
    parts = -(-len(y) // micro) if micro and len(y) > micro else 1
    opt.zero_grad(set_to_none=True)
    logits, total = [], 0.0
    for i, (xs, ys) in enumerate(zip(x.tensor_split(parts), y.tensor_split(parts))):
        with no_sync() if no_sync is not None and i < parts - 1 else contextlib.nullcontext():
            with autocast(x.device, amp):
                out = model(xs)
                loss = F.cross_entropy(out, ys, ignore_index=-1, reduction="sum",
                                       label_smoothing=cfg.optim.label_smoothing)
            scaler.scale(loss / divisor).backward()
        logits.append(out.detach())
        total = total + loss.detach()
    scaler.step(opt)
    scaler.update()
    return logits[0] if parts == 1 else torch.cat(logits), total / valid


def validation_counts(model: nn.Module, batches, device: torch.device, numerics: Numerics,
                      check=contextlib.nullcontext) -> torch.Tensor:
    """[top-1 hits, top-5 hits, images] over an iterable of (x, y) device batches, as float64 on the
    CPU. check: the context each batch's work runs in (NoHostSync)."""
    model.eval()
    hits, images = torch.zeros(2, dtype=torch.float64, device=device), 0
    k = min(5, unwrap(model).fc.out_features)
    with torch.no_grad(), autocast(device, numerics.amp):
        for x, t in batches:
            with check():
                top = model(x).topk(k, dim=1).indices
                hits += torch.stack([(top[:, 0] == t).sum(), (top == t[:, None]).any(dim=1).sum()]).double()
            images += len(t)  # counted here: a count made on the device would be one more copy to it
    return torch.cat([hits.cpu(), torch.tensor([images], dtype=torch.float64)])


class HostSync(RuntimeError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises HostSync at an op that makes the host wait for the device: a value read back (.item(),
    bool(), float() of a tensor, torch.equal, allclose), an op whose output's size depends on the
    values (nonzero, reading or writing through a boolean mask, masked_select, unique, bincount), a
    copy to the host, or a copy to the device that is not non_blocking from pinned memory. One of
    these in a step stops the CPU from queueing the next steps (and its input) while the GPU works.
    The training loop runs each step and validation batch in it with RAY_RESNET_CHECK_SYNCS=1 in
    the driver's environment (docs/gpu.md). On a CPU it finds the same ops but the copies (there
    is one device). Not seen: waits that are not ops (a stream's or event's synchronize).
    torch.compile does not compile under a dispatch mode: the model then runs eagerly."""

    READS = {"aten._local_scalar_dense.default": ".item(), bool(), int() or float() of a tensor",
             "aten.is_nonzero.default": "bool() of a tensor", "aten.equal.default": "torch.equal",
             "aten.allclose.default": "torch.allclose", "aten.nonzero.default": "nonzero",
             "aten.masked_select.default": "masked_select", "aten._unique.default": "unique",
             "aten._unique2.default": "unique", "aten.unique_dim.default": "unique",
             "aten.unique_consecutive.default": "unique_consecutive", "aten.bincount.default": "bincount"}
    MASKED = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
              "aten._index_put_impl_.default")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        what = self.READS.get(name)
        if name in self.MASKED and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            what = "a boolean mask as an index"
        elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            what = "repeat_interleave without output_size"
        elif name == "aten.lift_fresh.default" and args[0].device.type != "cpu":
            what = "torch.tensor(...) made on the device (a blocking copy)"
        elif name in ("aten._to_copy.default", "aten.copy_.default"):
            src = args[1] if name == "aten.copy_.default" else args[0]
            to = args[0].device if name == "aten.copy_.default" else torch.device(kwargs.get("device") or src.device)
            blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
            if src.device.type != to.type and (to.type == "cpu" or blocking or not src.is_pinned()):
                what = f"a copy from {src.device.type} to {to.type}" + (" that blocks" if to.type != "cpu" else "")
        if what:
            raise HostSync(f"{what} ({name}) makes the host wait for the device, at {self.caller()}; keep "
                           "the value on the device until the epoch's end")
        return func(*args, **kwargs)

    @staticmethod
    def caller() -> str:
        """The innermost line of this project's code that asked for the op."""
        root = Path(__file__).resolve().parents[1]
        for frame in reversed(traceback.extract_stack()):
            path = Path(frame.filename).resolve()
            if (not frame.filename.startswith("<") and path.is_relative_to(root) and ".venv" not in path.parts
                    and frame.name not in ("caller", "__torch_dispatch__")):
                return f"{path.relative_to(root)}:{frame.lineno} ({frame.line})"
        return "a line outside this project"


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A small CPU tensor summed (op="sum") or maximised (op="max") over the DDP workers; itself
    in a single process. NCCL reduces only CUDA tensors, so there it travels through the GPU."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    if dist.get_backend() == "nccl":
        u = t.cuda()
        dist.all_reduce(u, op=reduce_op)
        return u.cpu()
    t = t.clone()
    dist.all_reduce(t, op=reduce_op)
    return t


def all_gather(value) -> list:
    """Every worker's value (any picklable object), in rank order; [value] in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (the loop compiles a separate handle, never this one)."""
    return getattr(model, "module", model)
