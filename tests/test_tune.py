"""The sweep: each trial a distributed training, ASHA, MLflow parent and children, resume."""
import re
import shlex
import signal
import time

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.tune import sweep
from tests.conftest import CONFIG

BASE = ["tune.space={}", "data.batch_size=32", "data.shuffle_buffer=256", "schedule.epochs=2", "schedule.milestones=[]",
        "scaling.num_workers=1", "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_concurrent_trials=1"]


def runs(uri: str, experiment: str):
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def epochs_logged(client, run_id) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_error"))


def test_a_two_by_two_sweep_stops_weak_trials_and_logs_a_parent_with_four_children(tmp_path, ray_session, mlflow_uri):
    uri = mlflow_uri
    cfg = load_config(CONFIG, [*BASE, f"checkpoint.storage_path={tmp_path}", "tune.name=grid",
                               f"mlflow.tracking_uri={uri}", "mlflow.experiment=sweep-test",
                               # a learning rate too small to learn anything: ASHA's case to stop
                               "tune.space.model.depth=[8, 14]", "tune.space.optim.lr=[0.1, 0.00001]",
                               "tune.max_concurrent_trials=null", "mlflow.register_model=grid-best",
                               "mlflow.system_metrics_s=2"])
    rows, _ = sweep(cfg)  # two trials at once on the 5-CPU test cluster: MLflow through a local server
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert {(r["model.depth"], r["optim.lr"]) for r in rows} == {(8, 0.1), (8, 1e-05), (14, 0.1), (14, 1e-05)}
    assert rows[0]["optim.lr"] == 0.1 and rows[0]["best_val_error"] < 0.8  # best first, and it learned
    assert any(r["stopped_early"] and r["epochs"] == 1 for r in rows)     # ASHA stopped one at epoch 1
    assert all(r["stopped_early"] == (r["epochs"] < 2) for r in rows)

    client, parents, children = runs(uri, "sweep-test")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_epochs = sorted(len(epochs_logged(client, c.info.run_id)) for c in children)
    assert by_epochs == sorted(r["epochs"] for r in rows)             # every epoch each trial ran, once
    statuses = {c.info.run_name: c.info.status for c in children}  # a stopped trial's own FAILED once raced these
    assert set(statuses.values()) <= {"FINISHED", "KILLED"}, (statuses, rows)
    for child in children:  # each trial's rank 0 node, through the sweep's driver
        assert client.get_metric_history(child.info.run_id, "system/cpu_utilization_percentage"), child.info.run_name
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.csv", "results.md", "curves.png", "error_vs_depth.png", "config.yaml"}
    for child in children:  # a trial that ran all its epochs has its models, though ASHA stopped it at the last
        models = client.search_logged_models([parent.info.experiment_id],
                                             filter_string=f"source_run_id = '{child.info.run_id}'")
        assert {m.name for m in models} == ({"best_model", "final_model"} if statuses[child.info.run_name] == "FINISHED"
                                            else set()), child.info.run_name
    # the best trial's best model, and only it, registered
    versions = client.search_model_versions("name = 'grid-best'")
    best_child = next(c for c in children if c.info.run_name.startswith(rows[0]["trial"]))
    assert len(versions) == 1 and versions[0].run_id == best_child.info.run_id
    assert float(versions[0].tags["val_error"]) == pytest.approx(rows[0]["best_val_error"], rel=1e-5)
    table = client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path))
    assert open(table).read().splitlines()[0].startswith("model.depth,optim.lr,best_val_error,epochs,stopped_early")


def trial_states(tuner_dir) -> dict[str, str]:
    """trial id -> status, as Tune last saved its experiment state (what a restore starts from)."""
    import json
    states = {}
    for path in tuner_dir.glob("experiment_state-*.json"):
        try:
            for entry in json.loads(path.read_text())["trial_data"]:
                trial = json.loads(entry[0])
                states[trial["trial_id"]] = trial["status"]
        except (ValueError, KeyError):  # caught mid-write
            pass
    return states


def test_a_sweep_killed_midway_resumes_without_rerunning_finished_trials(tmp_path, ray_session, run_cli, mlflow_uri):
    """SIGKILL the sweep's driver once Tune has saved a finished trial; the same command again
    restores the sweep, runs only the trials not finished, and MLflow has each epoch once."""
    import ray
    uri = mlflow_uri
    args = ["--config", str(CONFIG), *BASE, f"checkpoint.storage_path={tmp_path}", "tune.name=killed",
            f"mlflow.tracking_uri={uri}", "mlflow.experiment=resume-test", "tune.space.model.depth=[8]",
            "tune.space.optim.lr=[0.1, 0.05, 0.02]", "tune.space.schedule.epochs=[1]"]
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the session's cluster: no second Ray
    proc = run_cli("pipelines.tune", *args, env=env, wait=False)
    deadline = time.time() + 300
    while "TERMINATED" not in (done := trial_states(tmp_path / "killed" / "tuner")).values():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # Ray ends the dead driver's trials and their workers
    proc.communicate()
    finished = {t for t, status in done.items() if status == "TERMINATED"}
    assert len(finished) < 3

    out = run_cli("pipelines.tune", *args, env=env, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming sweep killed" in out.stdout
    assert re.search(r"Trial name .* val_error +train_error +lr +images_per_s", out.stdout), out.stdout[-3000:]
    started = set(re.findall(r"(\w+)-lr=[\d.e-]+: cifar_resnet8: 1 worker on", out.stdout + out.stderr))
    assert started and not started & finished, (started, finished)  # only the unfinished ran again
    client, parents, children = runs(uri, "resume-test")
    assert len(parents) == 1 and len(children) == 3
    assert all(epochs_logged(client, c.info.run_id) == [1] for c in children)
    statuses = {c.info.run_name: c.info.status for c in children}
    assert set(statuses.values()) == {"FINISHED"}, (statuses, finished, out.stdout[-3000:] + out.stderr[-3000:])


def test_optuna_searches_a_log_uniform_range(tmp_path, ray_session, mlflow_uri):
    uri = mlflow_uri
    cfg = load_config(CONFIG, [*BASE, f"checkpoint.storage_path={tmp_path}", "tune.name=optuna",
                               f"mlflow.tracking_uri={uri}", "mlflow.experiment=optuna-test", "tune.search=optuna",
                               "tune.num_samples=2", "tune.max_concurrent_trials=null", "tune.scheduler=fifo", "schedule.epochs=1", "model.depth=8",
                               "tune.space.optim.lr={loguniform: [0.01, 0.3]}"])
    rows, _ = sweep(cfg)
    assert len(rows) == 2 and all(0.01 <= r["optim.lr"] <= 0.3 and r["epochs"] == 1 for r in rows)
    assert rows[0]["optim.lr"] != rows[1]["optim.lr"]
    client, parents, children = runs(uri, "optuna-test")
    assert len(parents) == 1 and len(children) == 2


def test_optuna_missing_is_said_before_the_sweep_starts(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    cfg = load_config(CONFIG, [f"checkpoint.storage_path={tmp_path}", "tune.search=optuna"])
    with pytest.raises(ConfigError, match="tune.search=optuna: Optuna is not installed; pip install"):
        sweep(cfg)


def test_a_grace_period_longer_than_the_trials_is_refused_before_the_sweep_starts(tmp_path):
    cfg = load_config(CONFIG, [f"checkpoint.storage_path={tmp_path}", "tune.space.schedule.epochs=[2]",
                               "tune.space.schedule.milestones=[[1]]"])
    with pytest.raises(ConfigError, match="tune.grace_period=4: ASHA first judges a trial after that many epochs, "
                                          "and the trials run at most 2"):
        sweep(cfg)



def test_a_finished_trials_models_come_from_epoch_ends_not_a_checkpoint_within_an_epoch(tmp_path, monkeypatch):
    # Its folder: epochs 1 and 2 (1 the better), a checkpoint within epoch 3 (after 2 epochs, so its
    # epoch ties with 2's end; the lowest error, were it an epoch's), and one a failed write left.
    import torch
    import pipelines.tune as T
    from pipelines import checkpoint
    cfg = load_config(CONFIG, [f"checkpoint.storage_path={tmp_path}", "run.name=trial"])

    def state(epoch, val_error, **more):
        return {"format": checkpoint.FORMAT, "model": {}, "config": {}, "model_name": "cifar_resnet8",
                "epoch": epoch, "history": [{"epoch": epoch, "val_error": val_error}], **more}
    for name, s in [("checkpoint_000001_a", state(1, 0.3)), ("checkpoint_000002_a", state(2, 0.4)),
                    ("checkpoint_000002_s000000010_a", state(2, 0.1, partial={"steps": 10}))]:
        (tmp_path / "trial" / name).mkdir(parents=True)
        torch.save(s, tmp_path / "trial" / name / "state.pt")
    (tmp_path / "trial" / "checkpoint_000003_a").mkdir()
    (tmp_path / "trial" / "checkpoint_000003_a" / "state.pt").write_bytes(b"half a file")
    logged = []
    monkeypatch.setattr(T, "log_models", lambda cfg, uri, final, best: logged.append((final, best)))
    T.log_trial_models(cfg, "sqlite:///unused.db")
    [(final, best)] = logged
    assert (final["epoch"], "partial" in final, best["epoch"]) == (2, False, 1)


def test_the_command_that_trains_the_best_values_keeps_the_sweeps_config_file_and_overrides():
    from pipelines.tune import train_command
    argv = ["--config", str(CONFIG), "data.shards=/data/my shards", "scaling.num_workers=2", "tune.space={}",
            "tune.space.model=[{unit: full_preact}, {unit: original, shortcut_variant: conv1x1}]",
            "tune.space.optim.lr=[0.1, 0.05]", "tune.space.schedule.epochs=[4]", "schedule.milestones=[]",
            "run.name=mine", "optim.lr=0.3", "model.unit=original", "--verbose"]
    cfg = load_config(CONFIG, [a for a in argv[2:] if "=" in a])
    command = train_command(argv, cfg, {"model": {"unit": "original", "shortcut_variant": "conv1x1"},
                                        "optim.lr": 0.05, "schedule.epochs": 4})
    # the file and its overrides, less tune.*, run.name and the keys the values found set; then
    # those (not schedule.epochs: one value fixes a setting for the sweep only)
    assert command == (f"python -m pipelines.train --config {CONFIG} 'data.shards=/data/my shards' "
                       "scaling.num_workers=2 'schedule.milestones=[]' --verbose model.unit=original "
                       "model.shortcut_variant=conv1x1 optim.lr=0.05 run.name=depth-sweep-best")
    assert train_command([], load_config(CONFIG, []), {"model.depth": 20, "optim.lr": 0.1}) == \
        "python -m pipelines.train --config ray_config.yaml model.depth=20 optim.lr=0.1 run.name=depth-sweep-best"
    # values as YAML reads them back: null, not the string "None"
    cfg = load_config(CONFIG, ["tune.space={}", "tune.space.data.num_classes=[null, 10]"])
    command = train_command([], cfg, {"data.num_classes": None})
    assert command.endswith(" data.num_classes=null run.name=depth-sweep-best")
    assert load_config(CONFIG, shlex.split(command)[5:-1]).data.num_classes is None
