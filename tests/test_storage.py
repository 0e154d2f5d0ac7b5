"""Object storage: shards written to s3://, a training that reads them there, checkpoints there,
resumes from them after a kill, and keeps its MLflow artifacts there; against moto's S3 server on
127.0.0.1, which here checks every request's signature, so credentials that do not reach a process
fail it. The secret key never shows: not on the console, in Ray's logs, MLflow or the bucket."""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
import torch

from pipelines.checkpoint import find_checkpoint
from pipelines.config import HOME, ConfigError, DataSection, load_config
from pipelines.runtime import free_port
from tests.conftest import CONFIG
from tests.test_elastic import audited_steps
from tests.test_train import SMALL, epochs_logged


def read_object(fs, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return b""

BUCKET = "ray-resnet"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server in a process of its own, on a free port of 127.0.0.1, that checks signatures
    (INITIAL_NO_AUTH_ACTION_COUNT: its first 3 requests make the user, its key and its policy; every
    later one must be signed with that key). Yields the endpoint, the key and the AWS variables a
    process needs to use it."""
    import boto3
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:  # up when it takes connections (a request would count as one of the 3)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moto's server did not start"
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
               "AWS_EC2_METADATA_DISABLED": "true"}  # no credentials looked for on a cloud's metadata service
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                              aws_secret_access_key=key["SecretAccessKey"])
        client.create_bucket(Bucket=BUCKET)
        yield SimpleNamespace(url=url, secret=key["SecretAccessKey"], env=env, client=client)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def objects(s3, prefix: str = "") -> dict[str, bytes]:
    """Every object in the bucket under prefix, by key."""
    out = {}
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def test_a_training_reads_its_shards_from_s3_checkpoints_there_resumes_after_a_kill_and_logs_artifacts_there(
        s3, tmp_path, ray_session, run_cli, monkeypatch):
    import ray
    from mlflow import MlflowClient
    from pipelines.data import shards_dir
    from pipelines.shards import Options, check_shards, fs_and_path, load_digits_source, load_manifest, write_shards
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)

    # The shard writer writes the bundled digits straight to the bucket (2 processes), the same
    # bytes as on a local disk: the manifest's checksums hold there.
    shards = f"s3://{BUCKET}/shards/digits"
    written = write_shards(load_digits_source(32, 0), shards, Options(rows_per_shard=512), workers=2, progress=None)
    local = load_manifest(shards_dir(DataSection()))  # written locally with the same options
    assert written["splits"] == local["splits"] and load_manifest(shards) == written
    for split in ("train", "val"):
        check_shards(shards, split, verify="sha256")

    # The session's Ray never had the credentials in its environment: the job's processes get them
    # only inside the filesystem the driver builds (pipelines.shards.fs_and_path). One worker: DDP is
    # not what this tests. The session's MLflow store: made once (a new one takes seconds).
    store = f"sqlite:///{HOME}/mlflow.db"
    args = ["--config", str(CONFIG), *SMALL, "run.name=s3run", "schedule.epochs=2", "scaling.num_workers=1",
            "data.batch_size=32", "checkpoint.every_steps=10",
            f"data.shards={shards}", f"checkpoint.storage_path=s3://{BUCKET}/runs", f"mlflow.tracking_uri={store}",
            f"mlflow.artifact_location=s3://{BUCKET}/mlflow", "mlflow.experiment=s3", "run.progress_s=0"]
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_RESNET_AUDIT_ROWS": str(tmp_path / "audit")}
    started = time.time()
    proc = run_cli("pipelines.train", *args, env=env, wait=False)
    fs, runs = fs_and_path(f"s3://{BUCKET}/runs/s3run")
    deadline = time.time() + 300
    # Killed mid-epoch 2: once Ray Train has registered a checkpoint within it (its snapshot, in
    # the bucket, names it)
    while b"checkpoint_000001_s" not in read_object(fs, f"{runs}/checkpoint_manager_snapshot.json"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # Ray ends the dead driver's job: its controller and workers
    first = proc.communicate()[0]
    assert "epochs 1..2" in first, first[-3000:]

    second = run_cli("pipelines.train", *args, env=env, timeout=400)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"resuming run s3run from its latest checkpoint in s3://{BUCKET}/runs/s3run" in out, out[-3000:]
    assert re.search(r"epochs 2\.\.2 \(resumed\)", out), out[-3000:]
    assert re.search(r"continuing epoch 2 from step [1-3]0 of 44 with 1 worker:", out), out[-3000:]
    steps = audited_steps(tmp_path / "audit")  # every image once in the interrupted epoch
    rows = [r for (epoch, _), (step_rows, _, _) in steps.items() if epoch == 2 for r in step_rows]
    assert sorted(s for e, s in steps if e == 2) == list(range(1, 45)) and len(rows) == len(set(rows)) == 44 * 32
    assert not (tmp_path / "home").exists()  # no local copy of the shards, no local run folder

    kept = sorted(i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(runs))
                  if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    with fs.open_input_stream(f"{kept[-1]}/state.pt") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True)
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    # evaluate --checkpoint takes the run's folder there: its best epoch end (none within an epoch)
    best, where = find_checkpoint(f"s3://{BUCKET}/runs/s3run")
    assert where.startswith(f"s3://{BUCKET}/runs/s3run/checkpoint_00000") and not best.get("partial")
    assert best["history"][-1]["val_error"] == min(row["val_error"] for row in state["history"])
    assert find_checkpoint(where)[0]["epoch"] == best["epoch"]
    scored = run_cli("pipelines.evaluate", "--checkpoint", f"s3://{BUCKET}/runs/s3run", "--out",
                     str(tmp_path / "eval.json"), env={"RAY_ADDRESS": env["RAY_ADDRESS"]})
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())  # single crop: training's validation, again
    assert result["images"] == 360 and result["top1_error"] == pytest.approx(best["history"][-1]["val_error"])

    client = MlflowClient(store)
    run = client.get_run(state["mlflow_run_id"])  # the first run's MLflow run, continued
    assert run.info.status == "FINISHED" and epochs_logged(client, run.info.run_id) == [1, 2]
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "curves.png"}
    models = client.search_logged_models([run.info.experiment_id])
    assert {m.name for m in models} == {"best_model", "final_model"}
    assert all(m.artifact_location.startswith(f"s3://{BUCKET}/mlflow/") for m in models)
    stored = objects(s3)
    assert sum(k.startswith("mlflow/") and k.endswith("/MLmodel") for k in stored) == 2
    assert {"runs/s3run/config.yaml", f"{run.info.artifact_uri.removeprefix(f's3://{BUCKET}/')}/config.yaml"} <= set(stored), \
        sorted(stored)

    # The secret key: not on the console, in the Ray logs written while the job ran, in MLflow's
    # store (params, tags, metrics), nor in any object in the bucket (MLflow's config.yaml, the
    # run's config.yaml, the checkpoints' configs).
    secret = s3.secret.encode()
    assert secret not in (first + out).encode()
    logs = Path(re.search(r"its own log lines in (\S+)", out).group(1))
    touched = [p for p in logs.rglob("*") if p.is_file() and p.stat().st_mtime >= started - 1]
    assert any(p.name.startswith("worker-") for p in touched), touched  # the job's processes' logs among them
    leaks = [p for p in touched if secret in p.read_bytes()]
    assert not leaks, leaks
    assert secret not in (HOME / "mlflow.db").read_bytes()
    assert not [k for k, body in stored.items() if secret in body]
    assert s3.secret not in json.dumps(run.data.params) + json.dumps(run.data.tags)


def test_a_missing_bucket_or_refused_credentials_is_one_line_naming_the_uri(s3, monkeypatch, tmp_path):
    from pipelines.shards import ShardError, load_digits_source, write_shards
    from pipelines.train import preflight
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    hint = "check that the bucket exists and the credentials may use it: AWS_ACCESS_KEY_ID"
    cfg = load_config(CONFIG, ["checkpoint.storage_path=s3://no-such-bucket/runs", "run.name=x"])
    with pytest.raises(ConfigError, match=r"^checkpoint.storage_path=s3://no-such-bucket/runs: cannot write "
                                          r"s3://no-such-bucket/runs/x/config.yaml \(.*NO_SUCH_BUCKET.*\); .*"
                                          + re.escape(hint)) as e:
        preflight(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ShardError, match=r"^s3://no-such-bucket/digits: cannot write there .*" + re.escape(hint)):
        write_shards(load_digits_source(8, 0), "s3://no-such-bucket/digits", progress=None)
    with pytest.raises(ConfigError, match=r"^s3://no-such-bucket/runs/x: no such directory; give a checkpoint_.*"
                                          + re.escape(hint)):
        find_checkpoint("s3://no-such-bucket/runs/x")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    cfg = load_config(CONFIG, [f"data.shards=s3://{BUCKET}/shards/digits", f"checkpoint.storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"^data.shards: s3://{BUCKET}/shards/digits/manifest.json: cannot read it "
                                          r"\(.*ACCESS_DENIED.*\); " + re.escape(hint)) as e:
        preflight(cfg)
    assert "\n" not in str(e.value) and "not-the-secret" not in str(e.value)
    with pytest.raises(ConfigError, match=rf"^s3://{BUCKET}/runs/x: cannot read it \(.*ACCESS_DENIED.*\); "
                                          + re.escape(hint)):
        find_checkpoint(f"s3://{BUCKET}/runs/x")


def test_gs_without_credentials_or_network_says_so_within_the_retry_limit_naming_the_uri(monkeypatch):
    """Google's C++ client retries for 15 minutes by default; fs_and_path caps it (GCS_RETRY_S,
    shortened here), so a machine without Google's credentials or network gets its one-line error
    (this machine has neither: the access token cannot be fetched) instead of a silent wait: the
    training, evaluate's checkpoint, and a sweep before it starts Ray."""
    import threading
    import pipelines.shards
    from pipelines.shards import fs_and_path
    from pipelines.train import preflight
    from pipelines.tune import sweep
    monkeypatch.setattr(pipelines.shards, "GCS_RETRY_S", 1)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    assert fs_and_path("gs://b/x?retry_limit_seconds=7")[0].__reduce__()[1][0]["retry_time_limit"].seconds == 7
    cfg = load_config(CONFIG, ["checkpoint.storage_path=gs://no-such-bucket/runs", "run.name=x"])
    errors = []

    def attempt():
        for call in (lambda: preflight(cfg), lambda: find_checkpoint("gs://no-such-bucket/runs/x"),
                     lambda: sweep(cfg)):  # before Ray starts
            try:
                call()
            except ConfigError as e:
                errors.append(str(e))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=90)
    assert not worker.is_alive(), "still waiting on gs:// after 90 s"
    hint = "check that the bucket exists and the credentials may use it: GOOGLE_APPLICATION_CREDENTIALS"
    assert len(errors) == 3, errors
    assert re.match(r"^checkpoint.storage_path=gs://no-such-bucket/runs: cannot write "
                    r"gs://no-such-bucket/runs/x/config.yaml \(.+\); .*" + re.escape(hint), errors[0]), errors[0]
    assert re.match(r"^gs://no-such-bucket/runs/x: (cannot read it \(.+\)|no such directory.*); .*"
                    + re.escape(hint), errors[1]), errors[1]
    assert re.match(r"^checkpoint.storage_path=gs://no-such-bucket/runs: cannot use gs://no-such-bucket/runs/"
                    r"depth-sweep \(.+\); .*" + re.escape(hint), errors[2]), errors[2]
    assert all("\n" not in e and "error_info" not in e for e in errors), errors


def test_a_sweep_on_a_cluster_without_the_credentials_keeps_its_checkpoints_and_models_in_s3(
        s3, tmp_path, ray_session, run_cli):
    """The sweep's driver has the S3 settings; the session's Ray, whose processes run the trial
    functions, does not (a cluster the driver joined). The trials get them through Ray's object
    store, so their checkpoints and models land in the bucket, and the secret shows nowhere."""
    import ray
    from mlflow import MlflowClient
    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--config", str(CONFIG), "tune.space={}", "data.batch_size=32", "data.shuffle_buffer=256",
            "schedule.milestones=[]", "scaling.num_workers=1", "tune.scheduler=fifo", "run.progress_s=0",
            f"checkpoint.storage_path=s3://{BUCKET}/sweeps", "tune.name=s3sweep", f"mlflow.tracking_uri={store}",
            f"mlflow.artifact_location=s3://{BUCKET}/mlflow", "mlflow.experiment=s3sweep",
            "tune.space.model.depth=[8]", "tune.space.optim.lr=[0.1]", "tune.space.schedule.epochs=[1]"]
    started = time.time()
    out = run_cli("pipelines.tune", *args, env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address, **s3.env},
                  timeout=400)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]

    stored = objects(s3)
    trial = re.search(r"(\w+): cifar_resnet8: 1 worker on", console).group(1)  # no searched key varies: its id
    assert any(re.fullmatch(rf"sweeps/s3sweep/{trial}/checkpoint_000001_[^/]+/state\.pt", k) for k in stored), \
        sorted(stored)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("s3sweep").experiment_id
    child = next(r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags)
    assert child.info.status == "FINISHED" and child.info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/")
    models = client.search_logged_models([experiment])
    assert {m.name for m in models} == {"best_model", "final_model"}
    assert all(m.artifact_location.startswith(f"s3://{BUCKET}/mlflow/") for m in models)

    # Not in the console, Tune's state in the bucket (tuner.pkl, params.pkl), MLflow, or the logs
    secret = s3.secret.encode()
    assert secret not in console.encode()
    assert not [k for k, body in stored.items() if secret in body]
    assert secret not in Path(tmp_path / "mlflow.db").read_bytes()
    logs = Path(re.search(r"its own log lines in (\S+)", console).group(1))
    touched = [p for p in logs.rglob("*") if p.is_file() and p.stat().st_mtime >= started - 1]
    assert touched and not [p for p in touched if secret in p.read_bytes()]
