"""Search depth x learning rate (and the papers' other axes) on Ray Tune:
    python -m pipelines.tune --config ray_config.yaml [key=value ...]

Reads top to bottom: config (tune.space: dotted key -> values, every combination validated) ->
MLflow parent run -> Tuner: each trial is one distributed training (pipelines.train.fit, a
TorchTrainer reporting through TuneReportCallback), ASHA stops the weak ones on validation error ->
results table and plots into the parent run -> the best configuration and the command that
trains it fully.

A sweep started again with the same tune.name restores Tune's state (Tuner.restore) and continues;
each trial's training resumes from its own checkpoints.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import ray.train

from pipelines.checkpoint import CheckpointError, load_state, read_text
from pipelines.config import Config, ConfigError, candidates, cli_errors, parse_cli, set_trial_value
from pipelines.console import Console
from pipelines.data import shards_dir
from pipelines.plots import error_vs_depth, trial_curves
from pipelines.ray_internals import tune_keeps_aws_keys_out_of_runtime_envs
from pipelines.runtime import TRIAL_CPU, driver_settings, start_ray, trial_resources
from pipelines.shards import fs_and_path, storage_error, storage_hint
from pipelines.tracking import (SystemMetricsLog, ensure_experiment, local_tracking_server, log_models, mlflow_client,
                               open_sweep_run, quiet_mlflow, register)
from pipelines.train import fit


def varying(cfg: Config) -> list[str]:
    """The searched keys; a key with one value only fixes a setting for the sweep (e.g. its epochs)."""
    return [k for k, values in cfg.tune.space.items() if isinstance(values, dict) or len(values) > 1]


def short(value) -> str:
    if isinstance(value, dict):  # a set of keys that go together: {"unit": "full_preact"}
        return ",".join(f"{k}={short(v)}" for k, v in value.items())
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def label(params: dict, keys: list[str]) -> str:
    """What tells one trial from another: "depth=20,lr=0.1", "depth=110,unit=full_preact"."""
    return ",".join(short(params[k]) if isinstance(params[k], dict) else f"{k.rsplit('.', 1)[-1]}={short(params[k])}"
                    for k in keys)


def trial_config(base: Config, params: dict, trial_id: str) -> Config:
    """The base config with one trial's values; its checkpoints under <storage>/<tune.name>/."""
    raw = base.model_dump(mode="json", exclude={"tune"})
    for key, value in params.items():
        set_trial_value(raw, key, value)
    # one folder name (config.SAFE_NAME): "milestones=[3, 6]" becomes "milestones=3,6"
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", re.sub(r"[\[\] ]", "", label(params, varying(base))))
    raw["run"]["name"] = (f"{trial_id}-{name}" if name else trial_id)[:200]
    raw["checkpoint"]["storage_path"] = sweep_dir(base)
    raw["mlflow"].update(register_model=None, model_alias=None)  # the sweep registers its best trial's model
    return Config.model_validate({**raw, "tune": {"space": {}}})


def sweep_dir(cfg: Config) -> str:
    return f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.tune.name}"


TABLE_COLUMNS = ("val_error", "train_error", "lr", "images_per_s")


def run_trial(config: dict, base: dict, parent_run_id: str, console: dict | None = None,
              env: dict | None = None) -> None:
    """One Tune trial: one TorchTrainer; its per-epoch reports become the trial's results, and its
    rank 0's lines go to the sweep's console, each with the trial's run name. config holds the
    searched values alone, base the sweep's config, env the driver's settings (runtime.driver_settings)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.update(env or {})
    base = Config.model_validate(base)
    params = {k: config[k] for k in base.tune.space}
    cfg = trial_config(base, params, tune.get_context().get_trial_id())

    class EpochsToTune(TuneReportCallback):
        """Whole epochs only: a checkpoint within an epoch (checkpoint.every_*) has no validation error.
        TABLE_COLUMNS first, since Tune's status table shows the first four metrics of a result."""

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics[0].get("partial"):
                first = {k: metrics[0][k] for k in TABLE_COLUMNS if k in metrics[0]}
                super().after_report(run_context, [{**first, **metrics[0]}, *metrics[1:]], checkpoint)

    fit(cfg, callbacks=[EpochsToTune()], parent_run_id=parent_run_id,
        console={**console, "tag": f"{cfg.run.name}: "} if console else None)


def log_trial_models(cfg: Config, uri: str) -> None:
    """A finished trial's best and final models into its MLflow run, from its checkpoints (once:
    log_models passes over a run that has them)."""
    fs, path = fs_and_path(cfg.run_dir)
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    states = []
    for info in found:
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            with contextlib.suppress(CheckpointError):  # one a failed write left: not a model
                state = load_state(ray.train.Checkpoint(info.path, filesystem=fs))
                if not state.get("partial"):  # one within an epoch: not a model of an epoch
                    states.append(state)
    if states:
        final = max(states, key=lambda s: s["epoch"])
        log_models(cfg, uri, final, min(states, key=lambda s: s["history"][-1]["val_error"]))


def register_best(cfg: Config, uri: str, experiment_id: str, run_id: str | None, val_error: float) -> None:
    """The best trial's best model as a new version of mlflow.register_model (and its alias)."""
    name = cfg.mlflow.register_model
    models = [m for m in mlflow_client(uri).search_logged_models([experiment_id],
                                                                 filter_string=f"source_run_id = '{run_id}'")
              if m.name == "best_model"] if run_id else []
    if not models:  # stopped before its last epoch (only a finished trial logs its models)
        print(f"not registered in {name}: the best trial has no best_model in MLflow", flush=True)
        return
    register(uri, name, models[0].model_uri, val_error, f"{cfg.tune.name}: best trial", cfg.mlflow.model_alias,
             what=f"the best trial's best model (run {run_id})")


def concurrency(cfg: Config) -> int:
    """As many trials at once as the cluster holds without oversubscribing (or tune.max_concurrent_trials)."""
    import ray
    total = ray.cluster_resources()
    cpus, gpus = trial_resources(cfg)
    fit_cpu = int(total.get("CPU", 0) // cpus)
    fit_gpu = int(total.get("GPU", 0) // gpus) if gpus else fit_cpu
    most = max(min(fit_cpu, fit_gpu), 1)
    return min(most, cfg.tune.max_concurrent_trials or most)


def searcher(cfg: Config):
    """Optuna's TPE (through Ray's integration) for search=optuna; None: Tune's own grid or random draws."""
    if cfg.tune.search != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401  (Ray's module imports without it)
    except ImportError:
        raise ConfigError("tune.search=optuna: Optuna is not installed; pip install 'optuna>=4' "
                          "(or the project's [optuna] extra), or use search=random") from None
    return OptunaSearch(metric="val_error", mode="min", seed=cfg.run.seed)


def search_space(cfg: Config) -> dict:
    from ray import tune
    choose = tune.grid_search if cfg.tune.search == "grid" else tune.choice
    draw = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    return {key: draw[next(iter(values))](*next(iter(values.values()))) if isinstance(values, dict)
            else choose(values) for key, values in cfg.tune.space.items()}


def max_epochs(cfg: Config) -> int:
    """The most epochs any trial of the sweep runs."""
    return int(max(candidates(cfg.tune.space.get("schedule.epochs", [cfg.schedule.epochs]))))


def _epochs(cfg: Config, trial: dict) -> int:
    return int(trial.get("schedule.epochs", cfg.schedule.epochs))


def to_markdown(rows: list[dict]) -> str:
    keys = list(rows[0]) if rows else []
    def fmt(key, v):
        return f"{v:.2%}" if key == "best_val_error" else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        w = csv.DictWriter(out, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out.getvalue()


def plots(grid, rows: list[dict], cfg: Config, directory: str) -> list[str]:
    """best validation error against depth, one line per value of the other keys; all trials' curves."""
    paths = []
    if "model.depth" in varying(cfg):
        other = [k for k in varying(cfg) if k != "model.depth" and isinstance(cfg.tune.space[k], list)]
        groups: dict = {}
        for r in rows:
            groups.setdefault(label(r, other) or "all", []).append((r["model.depth"], r["best_val_error"]))
        paths.append(f"{directory}/error_vs_depth.png")
        error_vs_depth(groups, f"{cfg.tune.name}: error against depth", paths[-1])
    curves = [{"label": label(r.config, varying(cfg)), "epochs": list(df["epoch"]),
               "train_error": list(df["train_error"]), "val_error": list(df["val_error"])}
              for r in grid if (df := r.metrics_dataframe) is not None and "val_error" in df]
    paths.append(f"{directory}/curves.png")
    trial_curves(curves, cfg.tune.name, paths[-1])
    return paths


def sweep(cfg: Config):
    """Run (or resume) the sweep; returns (rows best first, Tune's ResultGrid)."""
    if not cfg.tune.space:
        raise ConfigError("tune.space: empty; give at least one key to search, e.g. tune.space.model.depth=[20, 32]")
    if cfg.scaling.elastic:  # Tune reserves each trial's resources up front
        raise ConfigError(f"scaling.num_workers={list(cfg.scaling.num_workers)}: a sweep's trials train with a "
                          "fixed number of workers; give one number, e.g. scaling.num_workers="
                          f"{cfg.scaling.min_workers}")
    most = max_epochs(cfg)
    if cfg.tune.scheduler == "asha" and cfg.tune.grace_period > most:
        raise ConfigError(f"tune.grace_period={cfg.tune.grace_period}: ASHA first judges a trial after that many "
                          f"epochs, and the trials run at most {most} (schedule.epochs, or "
                          "tune.space.schedule.epochs); lower tune.grace_period or give the trials more epochs")
    search_alg = searcher(cfg)  # a missing Optuna, said before anything starts
    shards_dir(cfg.data)  # the bundled digits written once here, not by parallel trials racing to write them
    fs, path = fs_and_path(sweep_dir(cfg))
    try:  # storage that refuses or does not answer: said before Ray starts, after one request's retries
        fs.get_file_info(path)
    except OSError as e:
        raise ConfigError(f"checkpoint.storage_path={cfg.checkpoint.storage_path}: cannot use {sweep_dir(cfg)} "
                          f"({storage_error(e)}){storage_hint(sweep_dir(cfg))}") from None
    if not cfg.run.verbose:
        quiet_mlflow()
    ray_line = start_ray(cfg)
    if ray_line:
        print(ray_line, flush=True)
    limit = concurrency(cfg)
    uri = cfg.mlflow.resolved_uri()
    server = None
    if limit > 1 and uri.startswith("sqlite:"):
        # The experiment made over SQLite first: its runs then keep file artifact paths, which
        # resolve after the server is gone (a server would make them mlflow-artifacts:/ URIs).
        ensure_experiment(uri, cfg.mlflow.experiment, cfg.mlflow.artifact_location)
        uri, server = local_tracking_server(uri)
        print(f"{limit} trials at once: MLflow through a local server at {uri} over {cfg.mlflow.resolved_uri()}")
    base = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})
    try:
        # the trials' lines (no bars: they would interleave) and their rank 0's system metrics
        with (SystemMetricsLog(uri) as system, Console(progress_s=0, handlers={"system": system.log}) as console,
              tune_keeps_aws_keys_out_of_runtime_envs()):
            return _sweep(base, cfg, uri, limit, search_alg, console.channel())
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)


def _sweep(base: Config, cfg: Config, uri: str, limit: int, search_alg, console: dict):
    import ray.util
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    client = mlflow_client(uri)
    experiment_id = ensure_experiment(uri, cfg.mlflow.experiment, cfg.mlflow.artifact_location)
    directory = sweep_dir(cfg)
    parent = open_sweep_run(cfg, uri, experiment_id, directory)

    # Each trial function on the driver's node, where MLflow is reached (a server there may listen on
    # 127.0.0.1 only, as the local one for parallel trials does); its training workers go anywhere.
    here = f"node:{ray.util.get_node_ip_address()}"
    env = driver_settings()
    # The sweep's config beside the trials' configs, not in them: Tune prints a trial's config when
    # it starts, and should print only what the search chose.
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.model_dump(mode="json"),
                                                         parent_run_id=parent, console=console, env=env),
                                    {"CPU": TRIAL_CPU, here: 0.001})
    space = search_space(cfg)
    max_t = max_epochs(cfg)
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_error", mode="min", max_t=max_t,
                                  grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)
        stopping = f"ASHA on val_error (grace {cfg.tune.grace_period}, reduction {cfg.tune.reduction_factor})"
    else:
        scheduler, stopping = FIFOScheduler(), "every trial runs all its epochs"
    # Tune builds its own filesystem for its state: a storage_filesystem would be pickled, keys and
    # all, into tuner.pkl
    run_config = tune.RunConfig(name="tuner", storage_path=directory)
    t0 = time.time()
    if tune.Tuner.can_restore(f"{directory}/tuner"):
        print(f"resuming sweep {cfg.tune.name} from {directory}/tuner", flush=True)
        # Tune's saved search space, not ours again: Tune refuses one whose keys differ, and sweeps
        # saved before the sweep's config moved out of the trials' configs had more.
        tuner = tune.Tuner.restore(f"{directory}/tuner", trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                           tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search_alg,
                                                       num_samples=cfg.tune.num_samples,
                                                       max_concurrent_trials=limit))
    trials = cfg.tune.num_samples * (math.prod(len(v) for v in cfg.tune.space.values())
                                     if cfg.tune.search == "grid" else 1)
    print(f"sweep {cfg.tune.name}: {trials} trials, {limit} at a time, {stopping}", flush=True)
    grid = tuner.fit()

    rows, child_runs = [], {}
    for r in grid:
        df = r.metrics_dataframe
        values = {k: r.config[k] for k in cfg.tune.space}
        shown = {k: short(r.config[k]) if isinstance(r.config[k], dict) else r.config[k] for k in varying(cfg)}
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        planned = _epochs(cfg, r.config)
        rows.append({**shown,
                     "best_val_error": float(df["val_error"].min()) if epochs else math.nan,
                     "epochs": epochs, "stopped_early": r.error is None and epochs < planned,
                     "error": type(r.error).__name__ if r.error else "",
                     "wall_time_s": round(float(df["time_total_s"].max()), 1) if epochs else 0.0,
                     "trial": (r.metrics or {}).get("trial_id", "")})
        trial_id = (r.metrics or {}).get("trial_id")
        child = trial_id and read_text(directory, f"{trial_config(cfg, values, trial_id).run.name}/mlflow_run_id")
        if child:  # the driver ends the trials' runs: a trial Tune stopped never ended its own
            child_runs[rows[-1]["trial"]] = child.strip()
            status = "FAILED" if r.error else ("KILLED" if epochs < planned else "FINISHED")
            if status == "FINISHED":
                # ASHA stops a trial at its last epoch (max_t) as it stops a weak one, before its
                # fit logs the models: the driver logs them from the trial's checkpoints
                log_trial_models(trial_config(cfg, values, trial_id), uri)
            client.set_terminated(child.strip(), status)
    # A trial that failed before its first report has no trial id in its result: its run ends here.
    for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}' "
                                                   "and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, "FAILED")
    rows.sort(key=lambda row: (math.isnan(row["best_val_error"]), row["best_val_error"]))
    with tempfile.TemporaryDirectory() as d:
        Path(d, "results.csv").write_text(to_csv(rows))
        Path(d, "results.md").write_text(to_markdown(rows))
        for p in [f"{d}/results.csv", f"{d}/results.md", *plots(grid, rows, cfg, d)]:
            client.log_artifact(parent, p)
    if rows and not math.isnan(rows[0]["best_val_error"]):
        client.log_metric(parent, "best_val_error", rows[0]["best_val_error"])
        if cfg.mlflow.register_model:
            register_best(cfg, uri, experiment_id, child_runs.get(rows[0]["trial"]), rows[0]["best_val_error"])
    client.set_terminated(parent, "FINISHED")
    print(f"\n{to_markdown(rows)}\nsweep {cfg.tune.name} took {time.time() - t0:.0f} s; MLflow parent run {parent}")
    return rows, grid


def train_command(argv: list[str], cfg: Config, values: dict) -> str:
    """pipelines.train's command for a trial's values (its Tune config): the sweep's own command line
    (its config file and overrides: data, scaling, ...) less its tune.* keys, its run.name and the
    keys the values set, then the values (a set of keys that go together: one override each)."""
    def overrides(key, value) -> dict:
        if isinstance(value, dict):
            return {o: v for k, sub in value.items() for o, v in overrides(f"{key}.{k}", sub).items()}
        return {key: value if isinstance(value, str) else json.dumps(value)}  # JSON is YAML: null, true, [3]
    found = {o: v for k in varying(cfg) for o, v in overrides(k, values[k]).items()}
    kept = [a for a in argv if a.startswith("-") or "=" not in a or not (
        (key := a.partition("=")[0].strip()).startswith("tune.") or key in found or key == "run.name")]
    if not any(a == "--config" or a.startswith("--config=") for a in kept):
        kept = ["--config", "ray_config.yaml", *kept]
    return shlex.join(["python", "-m", "pipelines.train", *kept, *(f"{k}={v}" for k, v in found.items()),
                       f"run.name={cfg.tune.name}-best"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_cli(argv, "Search the tune.space of ray_config.yaml with Ray Tune and ASHA.",
                    prog="python -m pipelines.tune")
    with cli_errors():
        rows, grid = sweep(cfg)
    if not rows or math.isnan(rows[0]["best_val_error"]):
        print("no trial finished an epoch", file=sys.stderr)
        raise SystemExit(1)
    best = rows[0]
    values = next(r.config for r in grid if (r.metrics or {}).get("trial_id") == best["trial"])
    chosen = " ".join(f"{k}={best[k]}" for k in varying(cfg))
    print(f"best: {chosen + ': ' if chosen else ''}validation error {best['best_val_error']:.2%} after "
          f"{best['epochs']} epochs\ntrain it fully:  {train_command(argv, cfg, values)}")


if __name__ == "__main__":
    main()
