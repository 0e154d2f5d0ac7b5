"""ray_config.yaml as one typed, validated object, with dotted command-line overrides.

    cfg = parse_cli(["--config", "ray_config.yaml", "model.depth=56", "optim.lr=0.05"])

Every entry point reads its settings from here and passes `cfg` (or one of its sections) down.
Unknown keys are errors, and every error names the key, the value and what is accepted.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import itertools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import ConfigError, SetupError, cli_errors  # noqa: F401  (the entry points' endings)
from resnet_models import ModelConfig

# Per-user home for the embedded defaults: absolute, so `ray job submit` (whose working directory
# is a temporary copy) and every worker on a machine see the same runs and MLflow store.
HOME = Path(os.environ.get("RAY_RESNET_HOME", "~/ray-resnet")).expanduser()


MAX_CHECKED_TRIALS = 10_000


# A run or sweep name is one folder under checkpoint.storage_path and an MLflow run name.
# A sweep's trials are named like "a1b2c3-depth=20,lr=0.1".
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._,=+-]{0,199}")
SAFE_NAME_RULE = ("one folder name: letters, digits and . _ , = + -, starting with a letter or digit, "
                  "at most 200 characters")


def safe_name(key: str, value: str) -> str:
    if not SAFE_NAME.fullmatch(value):
        raise ValueError(f"{key}={value}: {SAFE_NAME_RULE}")
    return value


class Section(BaseModel):
    # run.name=2024 is a name, not an error; inf and nan are no setting's value
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        # pydantic reads true as 1 for an int or float field: data.batch_size=true is a mistake
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and ann in (int, float, int | None, float | None):
            raise ValueError(f"a number, not {str(v).lower()}")
        return v


class RunSection(Section):
    name: str = "digits-resnet20"            # checkpoints, MLflow run, resume key: one folder name
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's and Ray Data's seeds are 32-bit
    max_failures: int = Field(3, ge=-1)      # restarts from the last checkpoint after a worker dies; -1: always
    progress_s: float = Field(30, ge=0)      # a progress line this often within an epoch when the output
                                             # is not a terminal (a terminal gets a bar); 0: none
    verbose: bool = False                    # Ray's own log lines on the console too (else only in its logs)

    @model_validator(mode="after")
    def _check(self) -> "RunSection":
        safe_name("name", self.name)
        return self


class DataSection(Section):
    shards: str | None = None                # written by pipelines.shards; None: the bundled digits
    num_classes: int | None = Field(None, ge=2)  # None: the manifest's; set, it must agree with it
    batch_size: int = Field(128, ge=1)       # global: summed over all workers
    train_transform: Literal["cifar", "paper", "rrc"] = "cifar"
    crop_size: int = Field(32, ge=8)         # training crop and validation centre crop
    scale_range: tuple[int, int] = (256, 480)          # paper: random shorter side, then the crop
    rrc_scale: tuple[float, float] = (0.08, 1.0)       # rrc: area fraction of RandomResizedCrop
    val_resize: int | None = Field(None, ge=8)         # shorter side before the centre crop; None: native
    flip: bool = True                                  # random horizontal flip (not for digits or text)
    pca_lighting: float = Field(0.0, ge=0)             # AlexNet-style colour noise std (0.1 in fb.resnet)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    shuffle_buffer: int = Field(2048, ge=0)            # rows shuffled locally in each worker; 0: off
    decode: Literal["auto", "cpu", "gpu"] = "auto"     # where images are decoded and augmented: Ray Data's
                                                       # CPU tasks, or each worker's device; auto: gpu with GPUs
    decode_batch: int = Field(64, ge=1)                # rows per decode task (cpu)
    prefetch_batches: int = Field(2, ge=0)
    bad_records: Literal["skip", "fail"] = "skip"      # an undecodable row: log and skip, or stop
    deterministic: bool = False              # the same order for the same seed (slower: keeps order)

    @model_validator(mode="after")
    def _check(self) -> "DataSection":
        lo, hi = self.scale_range
        if not self.crop_size <= lo <= hi:
            raise ValueError(f"scale_range={list(self.scale_range)}: need crop_size ({self.crop_size}) "
                             "<= low <= high, e.g. [256, 480] for a 224 crop")
        if not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ValueError(f"rrc_scale={list(self.rrc_scale)}: need 0 < low <= high <= 1")
        if min(self.std) <= 0:
            raise ValueError(f"std={list(self.std)}: every channel's std must be positive")
        return self


class OptimSection(Section):
    lr: float = Field(0.1, gt=0, le=100)     # the learning rate at a global batch of lr_batch ...
    lr_batch: int = Field(128, ge=1)         # ... scaled linearly for other batch sizes
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0, le=1)
    no_decay_bn_bias: bool = False           # exempt BN parameters and biases from weight decay
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class ScheduleSection(Section):
    epochs: int = Field(10, ge=1, le=100_000)
    kind: Literal["step", "cosine"] = "step"
    milestones: list[int] = [5, 8]          # step: divide lr by 1/gamma at these ...
    milestone_unit: Literal["epoch", "iteration"] = "epoch"  # ... epochs, or the paper's 32k/48k iterations
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)   # linear warm-up from ~0 to lr
    warmup_lr: float | None = Field(None, gt=0)      # ResNet-110 recipe: hold this lr (at lr_batch) ...
    warmup_until_error: float | None = Field(None, gt=0, le=1)  # ... until train error < this

    @model_validator(mode="after")
    def _check(self) -> "ScheduleSection":
        if self.milestones != sorted(set(self.milestones)) or any(m <= 0 for m in self.milestones):
            raise ValueError(f"milestones={self.milestones}: strictly increasing positive numbers")
        if self.milestone_unit == "epoch" and self.milestones and self.milestones[-1] >= self.epochs:
            raise ValueError(f"milestones={self.milestones}: epoch milestones must be below "
                             f"schedule.epochs={self.epochs}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs:g}: at most schedule.epochs={self.epochs}")
        if (self.warmup_lr is None) != (self.warmup_until_error is None):
            raise ValueError(f"warmup_lr={self.warmup_lr}: set together with warmup_until_error "
                             "(the ResNet-110 recipe: warmup_lr=0.01, warmup_until_error=0.8)")
        return self


class ScalingSection(Section):
    # Ray Train workers (one process each, DDP): a number, or [min, max] to train elastically: start
    # once min fit, grow to max as nodes join, go on with those left when one is lost (docs/elastic.md)
    num_workers: int | tuple[int, int] = 2
    resize_interval_s: float = Field(60, ge=1)  # elastic: how often Ray Train looks for room to grow
    # At most this many rows through the model at once per worker (what its memory holds): more,
    # when few workers share the global batch, are accumulated in micro-batches. None: no limit.
    max_worker_batch: int | None = Field(None, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)  # 0: train on CPUs with gloo
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    sync_batchnorm: bool = False             # BN statistics over the global batch (GPUs only)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"   # auto: bf16 autocast on GPUs, off on CPUs
    channels_last: Literal["auto", "on", "off"] = "auto"   # auto: on GPUs
    # torch.compile the model (a minute or two of warm-up): auto (on GPUs) | on | off, or a mode
    compile: Literal["auto", "on", "off", "reduce-overhead", "max-autotune"] = "auto"

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, v):  # compile: true / false, as earlier configs wrote it
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, list, tuple)) or (
                not isinstance(v, int) and (len(v) != 2 or not all(type(n) is int for n in v))):
            raise ValueError("a number of workers, or [min, max], e.g. 4 or [2, 8]")
        if isinstance(v, int) and v < 1 or not isinstance(v, int) and not 1 <= v[0] <= v[1]:
            raise ValueError("at least 1 worker" + ("" if isinstance(v, int) else ", and min <= max, e.g. [2, 8]"))
        return v if isinstance(v, int) or v[0] < v[1] else v[0]

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.max_workers

    @model_validator(mode="after")
    def _check(self) -> "ScalingSection":
        if self.elastic and self.placement_strategy.startswith("STRICT"):
            # Ray sizes an elastic group from the nodes' resources alone, not the strategy:
            # a size it picks could never be placed
            raise ValueError(f"placement_strategy={self.placement_strategy}: with num_workers="
                             f"{list(self.num_workers)} use PACK or SPREAD")
        if self.gpus_per_worker == 0:
            if self.sync_batchnorm:
                raise ValueError("sync_batchnorm=true: torch's SyncBatchNorm runs only on GPUs; "
                                 "set gpus_per_worker > 0 or sync_batchnorm=false")
            if self.amp == "fp16":
                raise ValueError("amp=fp16: fp16 with a grad scaler is for GPUs; on CPUs use off or bf16")
        return self


class CheckpointSection(Section):
    storage_path: str | None = Field(None, validate_default=True)  # path or s3:// / gs:// URI; None: HOME/runs
    keep_best: int = Field(2, ge=1)          # best K by validation error, plus the latest
    # Within an epoch too, besides at its end: every this many steps and/or minutes (0: not), and at
    # once when Ray reports that a node of the run is being preempted. A resumed run continues the
    # epoch where it stopped, every image once (docs/elastic.md).
    every_steps: int = Field(0, ge=0)
    every_minutes: float = Field(0, ge=0)

    @field_validator("storage_path")
    @classmethod
    def _absolute(cls, v: str | None) -> str:  # workers and `ray job submit` run in other directories
        if v is None:
            return str(HOME / "runs")
        if not v.strip():
            raise ValueError("a local path or an s3:// / gs:// URI, or null for ~/ray-resnet/runs; not empty")
        return v if "://" in v else str(Path(v).expanduser().resolve())


class MlflowSection(Section):
    tracking_uri: str | None = None          # None: $MLFLOW_TRACKING_URI, else SQLite under HOME
    experiment: str = Field("ray-resnet", min_length=1)
    # Where a new experiment keeps its artifacts (models, curves, config.yaml), e.g. s3://bucket/mlflow
    # (MLflow writes s3:// with boto3: pip install 'ray-resnet[s3]'). None: beside the SQLite store,
    # or the tracking server's default. MLflow fixes it when it creates the experiment.
    artifact_location: str | None = Field(None, min_length=1)
    register_model: str | None = None        # a name: the run's best model (a sweep's: its best trial's)
                                             # becomes a new version of this registered model
    model_alias: str | None = None           # e.g. champion: moved to that version
    system_metrics_s: float = Field(10.0, ge=0)  # rank 0's node sampled this often; 0: off

    @model_validator(mode="after")
    def _check(self) -> "MlflowSection":
        if self.register_model is not None:
            safe_name("register_model", self.register_model)
        if self.model_alias is not None:
            if self.register_model is None:
                raise ValueError(f"model_alias={self.model_alias}: set mlflow.register_model too (the "
                                 "registered model the alias belongs to)")
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", self.model_alias):
                raise ValueError(f"model_alias={self.model_alias}: letters, digits, _ and - only, e.g. champion")
            if self.model_alias == "latest" or re.fullmatch(r"[vV]\d+", self.model_alias):
                raise ValueError(f"model_alias={self.model_alias}: MLflow reserves 'latest' and v<number>; "
                                 "choose another, e.g. champion")
        return self

    def resolved_uri(self) -> str:
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{HOME / 'mlflow.db'}")


# A range to draw from in a random search: {"loguniform": [0.01, 0.5]} or {"uniform": [0.0, 1e-3]}
Range = dict[Literal["loguniform", "uniform"], tuple[float, float]]


def candidates(values: list | dict) -> list:
    """What a sweep key may take, as far as validation goes: its values, or a range's two ends."""
    return list(next(iter(values.values()))) if isinstance(values, dict) else values


class TuneSection(Section):
    name: str = "depth-sweep"                # the sweep's folder and MLflow parent run: one folder name
    # Dotted config key -> the values to try, e.g. {"model.depth": [20, 32], "optim.lr": [0.05, 0.1]},
    # or a range for random search, e.g. {"optim.lr": {"loguniform": [0.01, 0.5]}}
    space: dict[str, list[Any] | Range] = {"model.depth": [20, 32], "optim.lr": [0.05, 0.1]}
    search: Literal["grid", "random", "optuna"] = "grid"  # optuna: pip install 'ray-resnet[optuna]'
    scheduler: Literal["asha", "fifo"] = "asha"  # fifo: every trial runs all its epochs (experiments)
    num_samples: int = Field(1, ge=1)        # grid: repeats of the grid; random, optuna: trials
    grace_period: int = Field(1, ge=1)       # ASHA: epochs before a trial may be stopped
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster fits

    @model_validator(mode="after")
    def _check(self) -> "TuneSection":
        safe_name("name", self.name)
        for key, values in self.space.items():
            if not values:
                raise ValueError(f"space.{key}=[]: give at least one value to try")
            if isinstance(values, dict):
                if len(values) != 1:
                    raise ValueError(f"space.{key}={values}: one range, e.g. {{loguniform: [0.01, 0.5]}}")
                (kind, (lo, hi)), = values.items()
                if not lo < hi or (kind == "loguniform" and lo <= 0):
                    raise ValueError(f"space.{key}={{{kind}: [{lo}, {hi}]}}: needs low < high"
                                     + (" and low > 0" if kind == "loguniform" else ""))
                if self.search == "grid":
                    raise ValueError(f"space.{key}: a range ({kind}) needs search=random or optuna; "
                                     "a grid takes a list of values")
        return self


class Config(Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelConfig = ModelConfig()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mlflow: MlflowSection = MlflowSection()
    tune: TuneSection = TuneSection()

    @model_validator(mode="after")
    def _check_batch(self) -> "Config":
        b, w = self.data.batch_size, self.scaling.max_workers
        if b < w:
            raise ValueError(f"data.batch_size={b}: the global batch gives every worker at least one image; "
                             f"at least scaling.num_workers ({w})")
        if 0 < self.data.shuffle_buffer < 2 * self.largest_worker_batch:
            # Ray Data's local shuffle then hands out short batches in mid-epoch (seen with 2.60)
            raise ValueError(f"data.shuffle_buffer={self.data.shuffle_buffer}: at least twice a worker's "
                             f"batch ({self.largest_worker_batch}), i.e. {2 * self.largest_worker_batch} or "
                             "more, or 0 for none")
        sc, most = self.scaling, self.largest_worker_batch
        if sc.compile in ("reduce-overhead", "max-autotune") and sc.max_worker_batch and most > sc.max_worker_batch:
            # CUDA graphs hand out a micro-batch's gradients in memory the next micro-batch's replay
            # overwrites: the sum is wrong (pytorch/pytorch#96693, #169545)
            raise ValueError(f"scaling.compile={sc.compile} runs the model as CUDA graphs, which lose all but the "
                             f"last micro-batch's gradients: a worker's batch of {most} is split by "
                             f"scaling.max_worker_batch={sc.max_worker_batch}. Use scaling.compile=on, or a "
                             f"max_worker_batch of {most} or more, or more workers")
        return self

    @model_validator(mode="after")
    def _check_space(self) -> "Config":
        # Every combination a sweep may try must make a valid config: checked now, not mid-sweep.
        space = self.tune.space
        if not space:
            return self
        for key in space:
            if key.split(".")[0] == "tune":
                raise ValueError(f"tune.space.{key}: a sweep cannot vary the tune section")
        values = [candidates(v) for v in space.values()]
        if math.prod(len(v) for v in values) > MAX_CHECKED_TRIALS:
            raise ValueError(f"tune.space: {math.prod(len(v) for v in values):,} combinations; "
                             f"at most {MAX_CHECKED_TRIALS:,} (each is validated before the sweep)")
        base = self.model_dump(exclude={"tune"})
        for combo in itertools.product(*values):
            raw = copy.deepcopy(base)
            try:
                for key, value in zip(space, combo):
                    set_trial_value(raw, key, value)
                Config.model_validate({**raw, "tune": {"space": {}}})
            except (ConfigError, ValidationError) as e:
                why = e if isinstance(e, ConfigError) else explain(e)
                trial = ", ".join(f"{k}={v}" for k, v in zip(space, combo))
                raise ValueError(f"tune.space: the trial {trial} is invalid: {why}") from None
        return self

    @property
    def run_dir(self) -> str:
        return f"{self.checkpoint.storage_path.rstrip('/')}/{self.run.name}"

    @property
    def decode_on_device(self) -> bool:
        """data.decode resolved: True when each worker decodes on its own device (pipelines.gpu_decode)."""
        return self.data.decode == "gpu" or (self.data.decode == "auto" and self.scaling.gpus_per_worker > 0)

    @property
    def largest_worker_batch(self) -> int:
        """A worker's most rows per step: with the fewest workers (pipelines.plan.rank_batches)."""
        return -(-self.data.batch_size // self.scaling.min_workers)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw['model']['depth'] = value for key 'model.depth'; tune.space takes dotted keys whole."""
    parts = key.split(".")
    node, schema = raw, Config
    for i, part in enumerate(parts[:-1]):
        field = schema.model_fields.get(part)
        if field is None:
            raise ConfigError(_unknown(".".join(parts[:i + 1]), schema))
        ann = field.annotation
        section = isinstance(ann, type) and issubclass(ann, BaseModel)
        if node.get(part) is None:  # absent, or an empty YAML section; a free mapping keeps its default
            node[part] = {} if section else copy.deepcopy(field.default)
        if not isinstance(node[part], dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a section")
        node = node[part]
        if not section:  # a free mapping (tune.space): the rest of the key is one entry
            node[".".join(parts[i + 1:])] = value
            return
        schema = ann
    if len(parts) == 1 and parts[0] in Config.model_fields:
        raise ConfigError(f"{key} is a section; override one of its keys, e.g. {key}."
                          f"{next(iter(Config.model_fields[key].annotation.model_fields))}=...")
    node[parts[-1]] = value


def set_trial_value(raw: dict, key: str, value: Any) -> None:
    """One sweep value: a dotted key's value, or, for a section such as "model", a set of its keys
    that go together (e.g. {"unit": "full_preact"} beside {"shortcut_variant": "conv1x1"})."""
    if key in Config.model_fields and isinstance(value, dict):
        for sub, v in value.items():
            set_dotted(raw, f"{key}.{sub}", v)
    else:
        set_dotted(raw, key, value)


def _schema_at(loc: tuple) -> type[BaseModel] | None:
    schema = Config
    for part in loc:
        field = schema.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        schema = ann
    return schema


def _unknown(dotted: str, schema: type[BaseModel] | None) -> str:
    key = dotted.rsplit(".", 1)[-1]
    where = dotted.rsplit(".", 1)[0] if "." in dotted else "the config"
    if schema is None:
        return f"{dotted}: unknown key"
    accepted = list(schema.model_fields)
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{dotted}: unknown key; {hint}{where} accepts {', '.join(accepted)}"


def explain(e: ValidationError) -> str:
    """One line per problem: 'model.depth=19: ImageNet ResNets have depth 18, 34, 50, 101 or 152'."""
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(map(str, loc))
        if err["type"] == "extra_forbidden":
            lines.append(_unknown(dotted, _schema_at(loc[:-1])))
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            if loc and _schema_at(loc) is None:  # one key's own check
                lines.append(f"{dotted}={err.get('input')}: {msg}")
            else:  # cross-field checks word their message as "key=value: what is accepted"
                lines.append(f"{dotted}.{msg}" if dotted else msg)
        else:
            lines.append(f"{dotted}={err.get('input')}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """The file (or base, a config as a dict, or the defaults) with `key=value` overrides applied, validated."""
    raw: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        raw = read_yaml(path)
        raw = {k: ({} if v is None else v) for k, v in raw.items()}  # an empty section: its defaults
    for item in overrides:  # in order: a later one wins (an entry point's preset, then the command line)
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write overrides as key=value, e.g. model.depth=56")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            value = text  # YAML 1.1 reads yes/no/on/off as booleans; only true/false mean that here
        set_dotted(raw, key.strip(), value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {key} is given twice in one section "
                                  f"(first on line {seen[key] + 1}); give each key once")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file's sections; every way a file can be wrong is a ConfigError in one line naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); a config is YAML text "
                          "like ray_config.yaml") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or str(e)
        raise ConfigError(f"{path}: {where}not valid YAML ({what})") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; a config names its sections (run, data, model, ...), "
                          "e.g. a copy of ray_config.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def mistake_sources(lines: list[str], config: str | os.PathLike) -> list[str]:
    """Where each line of the config's error comes from, to print before it: the file when the file
    alone gives that line, else the command line (its overrides made it: a typo, or a value that
    does not go with the file's); nothing when the line names its source."""
    try:
        load_config(config)
        alone = set()
    except ConfigError as e:
        alone = set(str(e).split("\n"))
    return ["" if line.startswith(str(config)) or "on the command line" in line
            else f"{config}: " if line in alone else "on the command line, " for line in lines]


def parse_cli(argv: list[str] | None, description: str, preset=None, prog: str | None = None) -> Config:
    """--config PATH, --print-config and key=value overrides; exits with a message on a mistake.

    preset(cfg) -> overrides: settings an entry point derives from the config (an experiment's grid
    for the config's model family), applied before the command line's own overrides. prog: the
    command its usage line shows (python -m pipelines.train).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="ray_config.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own log lines on the console too (the same as run.verbose=true)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. model.depth=56 optim.lr=0.05")
    args = parser.parse_args(argv)
    if args.verbose:
        args.overrides.append("run.verbose=true")
    try:
        given: dict[str, str] = {}
        for item in args.overrides:  # the same key twice on one command line is a slip, not a choice
            key = item.partition("=")[0].strip()
            if key in given:
                raise ConfigError(f"{key} is given twice on the command line ({given[key]!r} and {item!r}); "
                                  "give each key once")
            given[key] = item
        if preset:  # the file's own tune.space may not suit the family the command line picks
            cfg = load_config(args.config, [*preset(load_config(args.config, ["tune.space={}", *args.overrides])),
                                            *args.overrides])
        else:
            cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        lines = str(e).split("\n")
        for source, line in zip(mistake_sources(lines, args.config), lines):
            print(f"error: {source}{line}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(cfg.to_yaml(), end="")
        raise SystemExit(0)
    return cfg
