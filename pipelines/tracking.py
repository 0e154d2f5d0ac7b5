"""Where metrics go besides the console: MLflow, and the gauges the cluster's dashboards read.

    uri = cfg.mlflow.resolved_uri(); experiment_id = ensure_experiment(uri, cfg.mlflow.experiment)
    run_id = open_run(cfg, uri, experiment_id, stats)     # a new run, or the one a resumed run had
    log_lineage(uri, run_id, shards, manifest, summary)   # its data, code and one-line description
    EpochLog(uri, run_id).log(history)                    # each epoch once (pipelines.train.LogEpochs)
    log_models(cfg, uri, final, best)                     # the driver, at the end: models and curves
    Gauges(run_name, rank).set(images_per_s=...)          # every worker: Ray's Prometheus endpoint
    with SystemSampler(interval_s, send, gpus): ...       # rank 0: its node's CPU, memory, GPUs ...
    with SystemMetricsLog(uri) as system: system.log(sample)  # ... logged by the driver (system/<name>)

A run's MLflow run id is stored beside its checkpoints (<run_dir>/mlflow_run_id; a sweep's parent
in <sweep_dir>/mlflow_parent_run_id), so the same run.name continues the same MLflow run.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import resnet_models
from pipelines.checkpoint import read_text, save_text
from pipelines.config import HOME, Config, ConfigError, SetupError
from pipelines.plots import curves_png
from pipelines.ray_internals import job_submission_id
from pipelines.runtime import free_port
from resnet_models import build_model


def mlflow_client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def quiet_mlflow() -> None:
    """MLflow's INFO lines (creating the SQLite tables, ...) and its progress bars for artifacts
    (downloading a model to evaluate it) off the console."""
    import logging

    import mlflow  # noqa: F401  (its import sets its loggers' levels: set ours after it)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it if needed, with its artifacts at artifact_location (config
    mlflow.artifact_location). Without one, with the embedded SQLite store the artifacts go beside
    it under RAY_RESNET_HOME, not into the working directory (a temporary copy under `ray job submit`)."""
    if uri.startswith("sqlite:"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(name)
    if not found:
        location = artifact_location or ((HOME / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None)
        try:
            found = client.get_experiment(client.create_experiment(name, artifact_location=location))
        except Exception:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
            if not found:
                raise
    if artifact_location and found.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        raise ConfigError(f"mlflow.artifact_location={artifact_location}: the experiment {name} keeps its "
                          f"artifacts at {found.artifact_location} (MLflow fixes that when it creates an "
                          f"experiment); set mlflow.artifact_location to that or null, or choose a new mlflow.experiment")
    return checked_experiment(found)


def checked_experiment(experiment) -> str:
    """The experiment's id, once this process can write its artifacts: MLflow writes s3:// locations
    itself, through boto3, an optional package (shards and checkpoints go through pyarrow)."""
    if experiment.artifact_location.startswith("s3://") and importlib.util.find_spec("boto3") is None:
        raise SetupError(f"MLflow experiment {experiment.name} keeps its artifacts at "
                         f"{experiment.artifact_location}, which MLflow writes with boto3, not installed "
                         "here: pip install -c constraints.txt 'ray-resnet[s3]' (or boto3)")
    return experiment.experiment_id


def flat_params(raw: dict, prefix: str = "") -> dict[str, str]:
    """{"model.depth": "20", ...}: a config dict as MLflow params (tune.space stays one value)."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and k != "space":
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


def continue_or_create(client, directory: str, name: str, create) -> tuple[str, bool]:
    """(run id, continued): the MLflow run whose id is stored in directory/name, set RUNNING again;
    else the run create() makes, its id stored there. A store that lost the run (or another store)
    gets a new one."""
    known = read_text(directory, name)
    if known:
        with contextlib.suppress(Exception):
            client.update_run(known.strip(), status="RUNNING")
            return known.strip(), True
    run_id = create()
    save_text(directory, name, run_id)
    return run_id, False


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def open_run(cfg: Config, uri: str, experiment_id: str, stats: dict, parent_run_id: str | None = None) -> str:
    """The run's MLflow run id: the one recorded beside its checkpoints when the run resumes, else
    a new run with the resolved config, parameter count and MACs as params."""
    client = mlflow_client(uri)

    def create() -> str:
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run_id = client.create_run(experiment_id, run_name=cfg.run.name, tags=tags).info.run_id
        log_params(client, run_id, {**flat_params(cfg.model_dump(mode="json", exclude={"tune"})),
                                    "model.name": cfg.model.name, "params": str(stats["params"]),
                                    "macs": str(stats["macs"])})
        client.log_text(run_id, cfg.to_yaml(), "config.yaml")
        return run_id
    return continue_or_create(client, cfg.run_dir, "mlflow_run_id", create)[0]


def dataset_digest(split: dict) -> str:
    """One split's fingerprint from its shards' SHA-256 checksums (the manifest's): the same shards
    give the same digest in every run. 32 hex digits: MLflow stores at most 36 characters."""
    return hashlib.sha256("\n".join(s["sha256"] for s in split["shards"]).encode()).hexdigest()[:32]


def source_tags() -> dict[str, str]:
    """What code ran: the entry point, the package version, under `ray job submit` the job's id, and
    from a git checkout its commit and whether the tree had uncommitted changes."""
    from importlib.metadata import PackageNotFoundError, version
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    tags = {"mlflow.source.name": spec.name if spec else Path(sys.argv[0]).name,
            "mlflow.source.type": "JOB" if job_submission_id() else "LOCAL"}
    with contextlib.suppress(PackageNotFoundError):
        tags["ray_resnet.version"] = version("ray-resnet")
    if job_submission_id():
        tags["ray.job_submission_id"] = job_submission_id()
    root = Path(resnet_models.__file__).resolve().parents[1]
    if (root / ".git").exists():  # cluster/runtime_env.yaml leaves .git out of a job's upload: no commit there
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, timeout=10)
            if commit.returncode == 0 and changed.returncode == 0:
                tags["mlflow.source.git.commit"] = commit.stdout.strip()
                tags["ray_resnet.git_dirty"] = str(bool(changed.stdout.strip())).lower()
        except (OSError, subprocess.TimeoutExpired):  # no git here
            pass
    return tags


def log_lineage(uri: str, run_id: str, shards: str, manifest: dict, summary: str) -> None:
    """The run's training and validation shards as MLflow dataset inputs (name, the manifest's
    path, a digest of the shards' checksums, rows / shards / classes as profile), where its code
    came from (source_tags) and a one-line description on the run's page. Logged at every start:
    MLflow keeps an input once, and a resumed run's tags say what ran last."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, RunTag
    scheme = shards.split("://", 1)[0] if "://" in shards else "local"
    inputs = []
    for split, context in (("train", "training"), ("val", "validation")):
        part = manifest["splits"][split]
        dataset = Dataset(name=f"{Path(shards.rstrip('/')).name}-{split}", digest=dataset_digest(part),
                          source_type=scheme, source=json.dumps({"uri": f"{shards.rstrip('/')}/manifest.json"}),
                          profile=json.dumps({"rows": part["rows"], "shards": len(part["shards"]),
                                              "classes": len(manifest["classes"])}))
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    client = mlflow_client(uri)
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            break
        except Exception:  # parallel trials adding the same new dataset at once: MLflow's store checks,
            if attempt == 2:  # then inserts, and one of them meets the other's row; once there, it links
                raise
            time.sleep(1 + attempt)
    tags = {**source_tags(), "mlflow.note.content": summary}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def open_sweep_run(cfg: Config, uri: str, experiment_id: str, directory: str) -> str:
    """A sweep's parent run (named tune.name, the tune section as params), continued on resume."""
    client = mlflow_client(uri)

    def create() -> str:
        run_id = client.create_run(experiment_id, run_name=cfg.tune.name).info.run_id
        log_params(client, run_id, {f"tune.{k}": v for k, v in flat_params(cfg.tune.model_dump(mode="json")).items()})
        client.log_text(run_id, cfg.to_yaml(), "config.yaml")
        return run_id
    return continue_or_create(client, directory, "mlflow_parent_run_id", create)[0]


def ui_command(uri: str) -> str:
    """The command that opens the tracking store in MLflow's UI."""
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


class EpochLog:
    """Per-epoch metrics in the run's MLflow run (step = epoch), each epoch once: rows of epochs the
    run has logged already are passed over."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = mlflow_client(uri), run_id
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "val_error")}

    def log(self, history: list[dict]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        for row in history:
            if row["epoch"] in self.logged:
                continue
            self.client.log_batch(self.run_id, metrics=[
                Metric(k, float(v), now, row["epoch"]) for k, v in row.items() if k != "epoch"])
            self.logged.add(row["epoch"])


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


def log_models(cfg: Config, uri: str, final: dict, best: dict) -> None:
    """Into the run's MLflow run: the best and final model and the training curves (once per
    final epoch: a rerun that trained nothing new logs nothing)."""
    import mlflow
    import mlflow.pytorch
    client = mlflow_client(uri)
    run_id = final["mlflow_run_id"]
    if client.get_run(run_id).data.metrics.get("final_epoch") == final["epoch"]:
        return
    with tempfile.TemporaryDirectory() as d:
        curves_png(final["history"], f"{cfg.model.name} ({cfg.run.name})", f"{d}/curves.png")
        client.log_artifact(run_id, f"{d}/curves.png")
    # two images: MLflow exports the model with torch.export, which fixes a batch dimension of 1
    example = torch.zeros(2, 3, cfg.data.crop_size, cfg.data.crop_size).numpy()
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    logged = {}
    with fluent_mlflow(uri), mlflow.start_run(run_id=run_id):
        for name, state in (("best_model", best), ("final_model", final)):
            model = build_model(cfg.model, num_classes=state["num_classes"])
            model.load_state_dict(state["model"])
            logged[name] = mlflow.pytorch.log_model(model.eval(), name=name, input_example=example,
                                                    pip_requirements=requirements,
                                                    code_paths=[str(Path(resnet_models.__file__).parent)],
                                                    params={"epoch": state["epoch"]})
        mlflow.log_metrics({"best_val_error": best["history"][-1]["val_error"], "best_epoch": best["epoch"],
                            "final_epoch": final["epoch"]})
    if cfg.mlflow.register_model:
        register(uri, cfg.mlflow.register_model, logged["best_model"].model_uri, best["history"][-1]["val_error"],
                 cfg.run.name, cfg.mlflow.model_alias, what=f"the best model of {cfg.run.name}")


def register(uri: str, name: str, model_uri: str, val_error: float, run_name: str, alias: str | None,
             what: str) -> str:
    """A new version of the registered model `name` from model_uri, tagged with its validation error
    and run; the alias (when given) moved to it; a line saying so (what: which model). Returns the version."""
    import mlflow
    with fluent_mlflow(uri):
        version = mlflow.register_model(model_uri, name, tags={"val_error": f"{val_error:.6g}",
                                                               "run_name": run_name}).version
    if alias:
        mlflow_client(uri).set_registered_model_alias(name, alias, version)
    print(f"registered {name} version {version}" + (f" (@{alias})" if alias else "") + f": {what}", flush=True)
    return str(version)


# `python -c DYING_WITH_PARENT PID MODULE ARGS...` runs `python -m MODULE ARGS...` in its place, set
# to end with the process PID that started it, also when that one is killed (die_with_parent, set
# before the exec and kept across it; a preexec_fn would run Python in a fork of a process with threads).
DYING_WITH_PARENT = """\
import os, sys
from pipelines.shards import die_with_parent
die_with_parent()
if os.getppid() != int(sys.argv[1]):  # the parent ended before the line above
    sys.exit(1)
os.execv(sys.executable, [sys.executable, "-m", *sys.argv[2:]])
"""


def local_tracking_server(uri: str) -> tuple[str, subprocess.Popen]:
    """An MLflow server over the embedded SQLite store: parallel trials then write through one
    process instead of locking the database file against each other."""
    import urllib.request
    port = free_port()
    db = uri.removeprefix("sqlite:///")
    # Without MLflow's job execution (GenAI scorers, trace rollups: nothing a training logs), the
    # server starts no pool of job-consumer processes, each importing MLflow beside the trials.
    proc = subprocess.Popen([sys.executable, "-c", DYING_WITH_PARENT, str(os.getpid()), "mlflow", "server",
                             "--backend-store-uri", uri,
                             "--artifacts-destination", (Path(db).parent / "mlartifacts").as_uri(),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return url, proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SetupError(f"mlflow.tracking_uri={uri}: could not start a local MLflow server for "
                                 f"parallel trials (`{sys.executable} -m mlflow server` did not answer on port "
                                 f"{port}); set MLFLOW_TRACKING_URI to a tracking server, or "
                                 "tune.max_concurrent_trials=1") from None
            time.sleep(0.25)


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


class SystemSampler:
    """Rank 0's node, every interval_s seconds: MLflow's own system-metrics monitors (CPU, memory,
    disk, network; GPUs when the node has them and nvidia-ml-py loads), one sample handed to
    send(). Only the driver's node talks to MLflow (cluster/README.md), so rank 0 sends its samples
    through the console's queue and SystemMetricsLog logs them on the driver. interval_s 0: off."""

    def __init__(self, interval_s: float, send, gpus: bool):
        self.interval_s, self.send, self.gpus = interval_s, send, gpus
        self.stop = threading.Event()
        self.thread = None

    def monitors(self) -> list:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        if self.gpus:
            try:
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
                found.append(GPUMonitor())
            except (ImportError, RuntimeError) as e:  # no nvidia-ml-py, or NVML cannot start
                logging.getLogger(__name__).warning("no GPU system metrics: %s", e)
        return found

    def __enter__(self) -> "SystemSampler":
        if self.interval_s > 0:
            try:
                import psutil
                monitors = self.monitors()
            except ImportError as e:
                logging.getLogger(__name__).warning("no system metrics: %s (pip install psutil)", e)
                return self
            psutil.cpu_percent()  # its first call measures nothing: from here on, since the last
            self.thread = threading.Thread(target=self._run, args=(monitors,), name="system-metrics", daemon=True)
            self.thread.start()
        return self

    def _run(self, monitors: list) -> None:
        while not self.stop.wait(self.interval_s):
            values = {}
            for monitor in monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            try:
                self.send({"time_ms": int(time.time() * 1000), "metrics": values})
            except Exception:  # the driver's queue is gone: the run is ending
                return

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


class SystemMetricsLog:
    """The driver's side of SystemSampler: each sample into its run as system/<name> (where MLflow's
    run page shows system metrics), step = seconds since the run started, so a resumed run goes on
    from where it was. Logged from a thread of its own: a tracking server that does not answer
    (MLflow's client retries for minutes) costs samples, never the console or the training.

        with SystemMetricsLog(uri) as system, Console(..., handlers={"system": system.log}): ...
    """

    def __init__(self, uri: str):
        import queue
        self.uri, self.started, self.warned = uri, {}, False
        self.samples = queue.Queue(maxsize=1000)
        self.thread = threading.Thread(target=self._run, name="system-metrics-log", daemon=True)

    def __enter__(self) -> "SystemMetricsLog":
        self.thread.start()
        return self

    def log(self, sample: dict) -> None:
        import queue
        with contextlib.suppress(queue.Full):  # the server has been away for a long while
            self.samples.put_nowait(sample)

    def __exit__(self, *exc) -> None:
        self.log(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        from mlflow.entities import Metric
        client = mlflow_client(self.uri)
        while (sample := self.samples.get()) is not None:
            run_id = sample["run_id"]
            try:
                if run_id not in self.started:
                    self.started[run_id] = client.get_run(run_id).info.start_time
                step = max((sample["time_ms"] - self.started[run_id]) // 1000, 0)
                client.log_batch(run_id, metrics=[Metric(f"system/{k}", float(v), sample["time_ms"], step)
                                                  for k, v in sample["metrics"].items()])
            except Exception as e:
                if not self.warned:
                    logging.getLogger(__name__).warning("MLflow did not take system metrics (%s)", e)
                    self.warned = True
