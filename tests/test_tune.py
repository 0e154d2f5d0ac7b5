"""The sweep: each trial a distributed training, ASHA, MLflow parent and children."""
from pipelines.config import load_config
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


def test_a_two_by_two_sweep_stops_weak_trials_and_logs_a_parent_with_four_children(tmp_path, ray_session):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(CONFIG, [*BASE, f"checkpoint.storage_path={tmp_path}", "tune.name=grid",
                               f"mlflow.tracking_uri={uri}", "mlflow.experiment=sweep-test",
                               # a learning rate too small to learn anything: ASHA's case to stop
                               "tune.space.model.depth=[8, 14]", "tune.space.optim.lr=[0.1, 0.00001]"])
    rows, _ = sweep(cfg)  # 1-CPU workers + 1 decode CPU: two trials at once on the 4-CPU test cluster
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
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.csv", "results.md", "curves.png", "error_vs_depth.png", "config.yaml"}
    table = client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path))
    assert open(table).read().splitlines()[0].startswith("model.depth,optim.lr,best_val_error,epochs,stopped_early")
