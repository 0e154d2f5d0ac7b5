"""The training job: DDP that matches one worker, checkpoints, resume, restarts after a worker dies,
MLflow, dashboard gauges, multi-node, and mistakes caught before workers start."""
import gzip
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.config import Config, ConfigError, ScheduleSection, load_config
from pipelines.checkpoint import load_state
from pipelines.plan import rank_batches
from pipelines.recipe import Numerics, load_optimizer, lr_factor, make_optimizer, step_forward, train_step, unwrap
from pipelines.train import fit, unchecked_syncs
from resnet_models import build_model
from tests.conftest import CONFIG, ROOT

SMALL = ["model.depth=8", "schedule.milestones=[]", "data.shuffle_buffer=256"]


def small_cfg(tmp_path, *overrides):
    return load_config(CONFIG, [f"checkpoint.storage_path={tmp_path}", *SMALL, *overrides])


def mlflow_run(cfg, run_id):
    from mlflow import MlflowClient
    client = MlflowClient(cfg.mlflow.resolved_uri())
    return client, client.get_run(run_id)


def epochs_logged(client, run_id) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_error"))


def test_a_job_checkpoints_logs_to_mlflow_and_resumes_at_the_next_epoch(tmp_path, ray_session, monkeypatch, capsys):
    # and no step or validation batch of either start, DDP's included, makes the host wait for the device
    monkeypatch.setenv("RAY_RESNET_CHECK_SYNCS", "1")
    cfg = small_cfg(tmp_path, "run.name=resume", "schedule.epochs=1", "mlflow.system_metrics_s=1")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    first = load_state(fit(cfg).checkpoint)
    assert "2 workers on 1 node(s), cpu, host syncs checked; " in capsys.readouterr().out
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # logging the models leaves no trace behind
    assert first["epoch"] == 1 and len(first["history"]) == 1
    row = first["history"][0]
    assert row["train_error"] < 0.9 and row["images_per_s"] > 0 and 0 <= row["data_wait"] <= 1
    # two workers, 22 steps of 64: the epoch's last 1437 mod 64 rows wait for the next epoch; each
    # worker validates a contiguous share of the validation split, and none is lost
    assert row["train_dropped"] == 1437 % 64 and row["val_dropped"] == 0
    assert row["train_skipped"] == 0 and row["val_skipped"] == 0  # nothing undecodable in the digits
    saved = yaml.safe_load((tmp_path / "resume" / "config.yaml").read_text())
    assert Config.model_validate(saved) == cfg

    # Started again with the same name and one more epoch: it begins at epoch 2. It decodes in the
    # workers this time (data.decode=gpu, on their CPUs here), which loses nothing either.
    # It profiles five steps of its second epoch too (RAY_RESNET_PROFILE).
    longer = small_cfg(tmp_path, "run.name=resume", "schedule.epochs=2", "data.decode=gpu", "mlflow.system_metrics_s=1")
    monkeypatch.setenv("RAY_RESNET_PROFILE", str(tmp_path / "profile"))
    resumed_ms = time.time() * 1000
    result = fit(longer)
    with gzip.open(tmp_path / "profile" / "resume-epoch2.trace.json.gz") as f:
        events = json.load(f)["traceEvents"]
    assert sum(str(e.get("name", "")).startswith("ProfilerStep#") for e in events) == 5
    assert any(e.get("name") == "aten::convolution" for e in events)
    # the feed's thread, by the name its work is annotated with, for pipelines.profiling (the decoding
    # thread, a few batches ahead, has decoded the last of these 11 steps' before the profile starts)
    assert "feed: augment" in {e.get("name") for e in events}
    profiled = (tmp_path / "profile" / "resume-epoch2.txt").read_text()
    assert profiled.startswith("5 steps in ") and "aten::convolution_backward" in profiled
    second = load_state(result.checkpoint)
    assert [r["epoch"] for r in second["history"]] == [1, 2]
    assert second["history"][0] == row                       # epoch 1 was not trained again
    last = second["history"][1]
    assert last["train_dropped"] == row["train_dropped"] and last["val_dropped"] == 0
    assert last["train_skipped"] == 0 and last["val_skipped"] == 0 and last["train_error"] < row["train_error"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run continues
    kept = [p for p in (tmp_path / "resume").iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert len(kept) == 2

    client, run = mlflow_run(cfg, first["mlflow_run_id"])
    assert epochs_logged(client, run.info.run_id) == [1, 2]
    assert run.info.status == "FINISHED" and run.info.run_name == "resume"
    assert run.data.params["model.name"] == "cifar_resnet8" and run.data.params["params"] == "75290"
    assert run.data.params["optim.lr"] == "0.1" and int(run.data.params["macs"]) > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "curves.png"}
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert {m.name for m in models} == {"best_model", "final_model"}

    # Lineage: the shards as dataset inputs (logged once though the run started twice), the code,
    # and a one-line description on the run's page
    from pipelines.data import shards_dir
    from pipelines.shards import load_manifest
    from pipelines.tracking import dataset_digest
    shards = shards_dir(cfg.data)
    manifest = load_manifest(shards)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"} and len(run.inputs.dataset_inputs) == 2
    for context, split in (("training", "train"), ("validation", "val")):
        dataset = inputs[context]
        assert dataset.name == f"digits-{split}" and dataset.digest == dataset_digest(manifest["splits"][split])
        assert yaml.safe_load(dataset.source) == {"uri": f"{shards}/manifest.json"}
        assert yaml.safe_load(dataset.profile) == {"rows": manifest["splits"][split]["rows"], "classes": 10,
                                                   "shards": len(manifest["splits"][split]["shards"])}
    tags = run.data.tags
    assert tags["mlflow.note.content"] == (f"cifar_resnet8 (75,290 parameters) on {shards}: 1,437 training / 360 "
                                           "validation images, 10 classes; 2 epochs, 2 workers (CPUs)")
    assert tags["ray_resnet.version"] == "0.1.0" and tags["mlflow.source.type"] == "LOCAL"
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["ray_resnet.git_dirty"] in ("true", "false")

    # System metrics of rank 0's node, as MLflow's own monitor names them, from both starts; the
    # resumed run's samples come after the first's (step: seconds since the run started)
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
                 "disk_usage_percentage", "disk_available_megabytes", "network_receive_megabytes"):
        samples = client.get_metric_history(run.info.run_id, f"system/{name}")
        assert any(m.timestamp < resumed_ms for m in samples) and any(m.timestamp > resumed_ms for m in samples), name
        steps = [m.step for m in sorted(samples, key=lambda m: m.timestamp)]
        assert steps == sorted(steps) and steps[-1] > steps[0], (name, steps)
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert all(0 <= m.value <= 100 for m in cpu) and any(m.value > 0 for m in cpu)


def test_ddp_workers_take_the_same_steps_as_one_worker_with_the_whole_batch(tmp_path, ray_session):
    """Two workers of 16 rows, and three of 11, 11 and 10 (pipelines.plan's rule for a batch that
    does not split evenly: each loss scaled by its share), against one worker with all 32."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    cfg = small_cfg(tmp_path)

    def loop(config):
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(0)
        model = ray.train.torch.prepare_model(build_model("cifar_resnet8", num_classes=10))
        # BN from its running statistics: per-worker batch statistics differ from the whole
        # batch's, and SyncBatchNorm needs GPUs. Everything else is the job's own step.
        model.eval()
        opt = make_optimizer(model, config["cfg"].optim, global_batch=32)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
            q = rank_batches(32, world)
            part = slice(sum(q[:rank]), sum(q[:rank + 1]))
            train_step(model, opt, scaler, x[part], y[part], config["cfg"], None, share=32 / world)
        if rank == 0:
            torch.save(unwrap(model).state_dict(), config["out"])

    for world in (1, 2, 3):
        TorchTrainer(loop, train_loop_config={"cfg": cfg, "out": str(tmp_path / f"{world}.pt")},
                     scaling_config=ScalingConfig(num_workers=world),
                     run_config=RunConfig(name=f"ddp{world}", storage_path=str(tmp_path))).fit()
    one, two, three = (torch.load(tmp_path / f"{w}.pt") for w in (1, 2, 3))
    start = build_model("cifar_resnet8", num_classes=10).state_dict()
    assert not torch.equal(one["fc.weight"], start["fc.weight"])  # they did train
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(three[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_micro_batches_add_up_to_the_step_of_the_whole_batch(tmp_path):
    """scaling.max_worker_batch: 32 rows through the model at most 7 at a time (5 micro-batches), one
    update: the same weights as one pass of 32 (BN from its running statistics, as above)."""
    cfg = small_cfg(tmp_path, "scaling.max_worker_batch=7")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    weights, losses = [], []
    for micro in (None, cfg.scaling.max_worker_batch):
        torch.manual_seed(0)
        model = build_model("cifar_resnet8", num_classes=10).eval()
        opt = make_optimizer(model, cfg.optim, global_batch=32)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        logits, loss = zip(*[train_step(model, opt, scaler, x, y, cfg, None, share=32, micro=micro) for _ in range(2)])
        assert logits[0].shape == (32, 10)
        weights.append(model.state_dict())
        losses.append(torch.stack(loss))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("amp, channels_last, compile, tol", [
    (None, True, False, 1e-4), (torch.bfloat16, False, False, 3e-2), (torch.bfloat16, True, False, 3e-2),
    (None, False, True, 1e-4)])
def test_bf16_channels_last_and_compile_train_as_fp32_does(tmp_path, amp, channels_last, compile, tol):
    """The GPU defaults (bf16 autocast, NHWC) and torch.compile, checked on CPU against eager fp32
    NCHW: the same losses over a few steps and the same weights, within the precision's tolerance."""
    cfg = small_cfg(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)

    def run(amp, channels_last, compile=False):
        torch.manual_seed(0)
        model = build_model("cifar_resnet8", num_classes=10)
        xx = x
        if channels_last:
            model, xx = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = make_optimizer(model, cfg.optim, global_batch=32)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        forward = step_forward(model, Numerics(amp, channels_last, "default" if compile else None), torch.device("cpu"))
        steps = [train_step(forward, opt, scaler, xx, y, cfg, amp) for _ in range(3)]
        assert steps[0][0].dtype == (amp or torch.float32)  # autocast did run in that precision
        return [loss.item() for _, loss in steps], model.state_dict()

    ref_losses, ref = run(None, False)
    losses, state = run(amp, channels_last, compile)
    assert losses == pytest.approx(ref_losses, rel=tol)
    assert ref_losses[-1] < ref_losses[0]
    for k in ref:
        torch.testing.assert_close(state[k].float(), ref[k].float(), rtol=tol, atol=tol, msg=k)


def test_a_step_and_a_validation_batch_never_make_the_host_wait_for_the_device(tmp_path):
    """NoHostSync (RAY_RESNET_CHECK_SYNCS=1; the resume test runs whole epochs under it) lets a step
    with micro-batches and bf16, the epoch's sums and validation through, and stops at each way of
    reading a value back, naming the line that asked for it."""
    from pipelines.recipe import HostSync, NoHostSync, validation_counts
    cfg = small_cfg(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    y[3] = -1  # an undecodable image's placeholder
    model = build_model("cifar_resnet8", num_classes=10)
    opt = make_optimizer(model, cfg.optim, global_batch=32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums = torch.zeros(3, dtype=torch.float64)
    for amp, micro in ((None, None), (torch.bfloat16, 12)):
        with NoHostSync():
            logits, loss = train_step(model, opt, scaler, x, y, cfg, amp, share=32, micro=micro)
            ok = y >= 0
            n = ok.sum()
            sums += torch.stack([loss.float() * n, ((logits.argmax(1) != y) & ok).sum(), n]).double()
    assert sums[2] == 62 and torch.isfinite(sums).all()
    counts = validation_counts(model, [(x[:20], y[:20]), (x[20:], y[20:])], torch.device("cpu"), Numerics(None, False),
                               check=NoHostSync)
    assert counts[2] == 32 and 0 <= counts[0] <= counts[1] <= 32

    def masked_write():
        logits[~ok] = 0

    for read in (lambda: loss.item(), lambda: float(loss), lambda: bool(n > 3), lambda: logits[ok], masked_write,
                 lambda: ok.nonzero(), lambda: y.unique(), lambda: torch.allclose(loss, loss)):
        with pytest.raises(HostSync, match=r"makes the host wait for the device, at tests/test_train.py:\d+ "):
            with NoHostSync():
                read()


def ray_pids(name: bytes) -> list[int]:
    """This test session's Ray actors of class NAME (command line ray::NAME ...), oldest first: the
    session's Ray is started by this process, so they descend from it."""
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::" + name):
                pid = int(proc.name)
                while pid > 1 and pid != os.getpid():
                    pid = parent(pid)
                if pid == os.getpid():
                    pids.append(int(proc.name))
        except OSError:
            pass
    return sorted(pids, key=lambda pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]))


def test_a_worker_lost_before_its_checkpoint_counts_leaves_no_trace_of_that_attempt(tmp_path, ray_session, run_cli,
                                                                                    mlflow_uri):
    """Epoch 2 is trained and its checkpoint written, but a worker dies before Ray Train registers
    it (its controller is held still meanwhile): Ray retrains epoch 2 from epoch 1's checkpoint.
    MLflow must hold the retrained epoch's numbers, each epoch once, and the first attempt's
    checkpoint must be gone."""
    import ray
    args = [*SMALL, "run.name=fault", "schedule.epochs=3", f"mlflow.tracking_uri={mlflow_uri}", "run.progress_s=0.5"]
    cfg = small_cfg(tmp_path, *args)
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args.append(f"checkpoint.storage_path={tmp_path}")
    proc = run_cli("pipelines.train", "--config", str(CONFIG), *args, env=env, wait=False)
    run_dir = tmp_path / "fault"
    deadline = time.time() + 240

    def wait_for(what):
        while not what():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)

    # Ray Train has registered epoch 1's checkpoint once its snapshot names it
    wait_for(lambda: (run_dir / "checkpoint_manager_snapshot.json").exists())
    controller = ray_pids(b"TrainController")[-1:]  # this job's: the newest
    assert controller
    os.kill(controller[0], signal.SIGSTOP)
    try:  # epoch 2's checkpoint written by both workers, not registered
        wait_for(lambda: any({"state.pt", "rng-0.pt", "rng-1.pt"} <= {f.name for f in d.iterdir()}
                             for d in run_dir.glob("checkpoint_000002_*")))
        time.sleep(1)
        discarded = next(run_dir.glob("checkpoint_000002_*")).name
        killed_at = time.time()
        os.kill(ray_pids(b"RayTrainWorker")[-1], signal.SIGKILL)
    finally:
        os.kill(controller[0], signal.SIGCONT)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"epochs 2\.\.3 \(resumed\)", out), out[-3000:]  # from epoch 1's checkpoint
    # the console: rank 0's lines and progress through the driver, none of Ray's own
    assert re.search(r"^  epoch \d: [\d,]+/\d[\d,]* images \(\d+%\), [\d,]+ img/s, data wait \d+%, ETA ", out, re.M), out
    assert re.search(r"^done: 3 epochs in .*\ncheckpoints: .*\nMLflow run \w+ in experiment ray-resnet; to see it: "
                     r"mlflow ui --backend-store-uri sqlite:///", out, re.M), out[-3000:]
    assert "Reporting training result" not in out and "pid=" not in out, out[-3000:]

    kept = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert discarded not in kept and len(kept) <= cfg.checkpoint.keep_best + 1, kept
    final = load_state(run_dir / kept[-1])
    assert [r["epoch"] for r in final["history"]] == [1, 2, 3]
    client, run = mlflow_run(cfg, final["mlflow_run_id"])
    assert epochs_logged(client, run.info.run_id) == [1, 2, 3]
    epoch2 = next(m for m in client.get_metric_history(run.info.run_id, "val_error") if m.step == 2)
    assert epoch2.timestamp > killed_at * 1000 and epoch2.value == final["history"][1]["val_error"]


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes_once_there_is_room(
        tmp_path, ray_session, run_cli, small_disk):
    import ray
    disk = small_disk(1_000_000)  # room for one checkpoint of ResNet-8 (0.65 MB), not two
    args = ["--config", str(CONFIG), *SMALL, "run.name=full", "schedule.epochs=2", "run.max_failures=0",
            f"checkpoint.storage_path={disk}"]
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = run_cli("pipelines.train", *args, env=env, timeout=400)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.fullmatch(rf"error: storage full at {disk}/full: 0\.\d MB free, a checkpoint takes 0\.\d MB; free space "
                        r"there and run the same command to resume from the last checkpoint\n", out.stderr), out.stderr
    assert "Traceback" not in out.stdout
    kept = sorted(d for d in (disk / "full").iterdir() if d.is_dir())
    assert [load_state(d)["epoch"] for d in kept] == [1]  # whole, and nothing partial beside it

    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    out = run_cli("pipelines.train", *args, env=env, timeout=400)
    assert out.returncode == 0 and "epochs 2..2 (resumed)" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^done: epoch 2 in .* \(2 in all\); final val error", out.stdout, re.M), out.stdout[-3000:]


@pytest.mark.parametrize("overrides, message", [
    (["data.num_classes=7"], "data.num_classes=7: "),
    (["data.shards=/nonexistent/shards"], "data.shards: /nonexistent/shards/manifest.json: cannot read it"),
    (["checkpoint.storage_path=/proc/no-such-dir"], "checkpoint.storage_path=/proc/no-such-dir: cannot write"),
    (["scaling.gpus_per_worker=1"], "needs 2 GPUs, the cluster has 0"),
    (["scaling.num_workers=5", "data.batch_size=160"], "training takes 5 of the cluster's 5 CPUs"),
    (["data.batch_size=2048"], "has 1437 training images, fewer than one global batch"),
])
def test_mistakes_are_refused_before_any_worker_starts(tmp_path, ray_session, overrides, message):
    cfg = load_config(CONFIG, [f"checkpoint.storage_path={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        fit(cfg)


def test_a_run_name_with_checkpoints_of_another_model_is_refused(tmp_path, ray_session):
    old = small_cfg(tmp_path, "run.name=taken")
    (tmp_path / "taken" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (tmp_path / "taken" / "config.yaml").write_text(old.to_yaml())
    with pytest.raises(ConfigError, match=r"run.name=taken: .* another model \(model.depth: 8 -> 14\); choose a new run.name"):
        fit(small_cfg(tmp_path, "run.name=taken", "model.depth=14"))


def test_the_cli_reports_a_mistake_in_one_line_without_a_traceback(run_cli, tmp_path):
    out = run_cli("pipelines.train", "--config", str(CONFIG), "data.num_classes=7")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: data.num_classes=7:" in out.stderr and "lists 10 classes" in out.stderr

    # A truncated shard is refused before Ray starts: one line naming it and both sizes.
    from pipelines.shards import Options, load_digits_source, load_manifest, write_shards
    shards = tmp_path / "shards"
    write_shards(load_digits_source(32, 0), shards, Options(rows_per_shard=512), progress=None)
    entry = load_manifest(str(shards))["splits"]["train"]["shards"][1]
    path = shards / entry["file"]
    path.write_bytes(path.read_bytes()[:1000])
    out = run_cli("pipelines.train", "--config", str(CONFIG), f"data.shards={shards}")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Ray:" not in out.stdout
    assert out.stderr.strip() == (f"error: data.shards: {path}: 1,000 bytes, the manifest records "
                                  f"{entry['bytes']:,} (truncated or replaced); rewrite the shards")


def test_step_schedule_by_epoch_and_by_iteration():
    s = ScheduleSection(epochs=10, milestones=[5, 8])
    assert [lr_factor(e * 10, 10, s) for e in (0, 4, 5, 7, 8, 9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    paper = ScheduleSection(epochs=200, milestones=[32000, 48000], milestone_unit="iteration")
    assert [lr_factor(i, 391, paper) for i in (31999, 32000, 48000)] == pytest.approx([1, 0.1, 0.01])


def test_cosine_schedule_and_linear_warmup():
    s = ScheduleSection(epochs=10, kind="cosine", milestones=[], warmup_epochs=2)
    assert lr_factor(0, 100, s) == pytest.approx(1 / 200 * math.cos(0))
    assert lr_factor(199, 100, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.199)))
    assert lr_factor(500, 100, s) == pytest.approx(0.5)
    assert lr_factor(1000, 100, s) == pytest.approx(0.0)


def test_lr_scales_with_global_batch_and_bn_bias_can_skip_decay():
    cfg = Config().optim.model_copy(update={"lr": 0.1, "lr_batch": 256, "no_decay_bn_bias": True})
    model = build_model("cifar_resnet20", num_classes=10)
    opt = make_optimizer(model, cfg, global_batch=1024)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.4)] * 2
    decay, no_decay = opt.param_groups
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"]) and no_decay["weight_decay"] == 0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


def test_a_resumed_optimizer_keeps_its_own_kernels_and_the_checkpoints_momentum():
    """A run checkpointed on CPUs (SGD unfused) and resumed on GPUs (fused): torch's load_state_dict
    alone would take the saved flags too, and step unfused."""
    model = torch.nn.Linear(4, 2)
    saved = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    model(torch.randn(3, 4)).sum().backward()
    saved.step()
    resumed = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)  # fused runs on CPUs too
    load_optimizer(resumed, saved.state_dict())
    assert (resumed.param_groups[0]["fused"], resumed.param_groups[0]["foreach"]) == (True, None)
    for p in model.parameters():
        assert torch.equal(resumed.state[p]["momentum_buffer"], saved.state[p]["momentum_buffer"])


def test_only_ops_that_sync_by_design_keep_a_run_from_checking_host_syncs():
    """RAY_RESNET_CHECK_SYNCS=1 would stop these runs at their third step: their start line says why
    they are not checked instead."""
    gpu = Config.model_validate({"scaling": {"gpus_per_worker": 1, "sync_batchnorm": True}})
    bf16, fp16 = Numerics(torch.bfloat16, True), Numerics(torch.float16, True)
    assert "SyncBatchNorm" in unchecked_syncs(gpu, bf16, world=2)
    assert unchecked_syncs(gpu, bf16, world=1) == ""  # one worker: plain BatchNorm
    assert "fp16" in unchecked_syncs(Config(), fp16, world=1)
    assert unchecked_syncs(Config(), bf16, world=4) == ""


def test_undecodable_rows_leave_the_batch_on_the_host_and_a_batch_of_nothing_else_still_steps(tmp_path):
    """Placeholders (label -1, data.bad_records=skip) never reach the model, so they touch neither
    BatchNorm nor the gradient; a batch made only of them keeps one, whose loss is zero, because
    DDP needs every worker's step."""
    import numpy as np
    from pipelines.data import usable_rows
    labels = np.array([3, -1, 5, -1])
    batch = {"image": np.arange(4)[:, None], "label": labels, "key": ["a", "b", "c", "d"]}
    kept, bad = usable_rows(batch)
    assert bad == 2 and kept["label"].tolist() == [3, 5] and kept["key"] == ["a", "c"]
    assert kept["image"].ravel().tolist() == [0, 2]
    assert usable_rows({**batch, "label": np.array([3, 4, 5, 6])})[1] == 0
    only_bad = {**batch, "label": np.full(4, -1)}
    assert usable_rows(only_bad)[0]["label"].tolist() == []
    one, bad = usable_rows(only_bad, keep_one=True)
    assert bad == 4 and one["label"].tolist() == [-1] and one["key"] == ["a"]

    cfg = small_cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model("cifar_resnet8", num_classes=10)
    opt = make_optimizer(model, cfg.optim, global_batch=1)
    _, loss = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.zeros(1, 3, 32, 32),
                         torch.tensor([-1]), cfg, None)
    assert loss.item() == 0.0


def test_checkpoints_within_an_epoch_come_every_n_steps_every_m_minutes_and_once_a_preemption_notice(
        tmp_path, monkeypatch):
    """Epoch.due, with Ray Train's collectives replaced by one worker's answers: every_steps by the
    step count; a preemption notice (with or without a deadline) once, and again for another node;
    every_minutes by rank 0's clock, asked at the same steps as the notices."""
    import types

    import ray.train
    import ray.train.collective
    from pipelines import plan
    from pipelines.train import Epoch

    notices = []
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: notices[-1] if notices else None)
    monkeypatch.setattr(ray.train.collective, "broadcast_from_rank_zero", lambda value: value)
    cfg = small_cfg(tmp_path, "checkpoint.every_steps=5", "data.batch_size=24")
    units = plan.read_units([("a", 0, [256] * 5 + [181])])  # 1,461 rows: 60 steps of 24
    job = types.SimpleNamespace(cfg=cfg, info={"train_rows": 1461, "units": units}, world=2, rank=0, epoch=0,
                                history=[], partial=None, preemption=None)
    say = types.SimpleNamespace(lines=[])
    say.line = say.lines.append
    ep = Epoch(job, say)
    assert (ep.steps, ep.check_every, len(ep.rows), ep.batch) == (60, 10, 60 * 12, 12)
    assert [s for s in range(1, 61) if ep.due(job, s, say)] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55]
    notices.append(ray.train.PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"n1": [1]}))
    assert [s for s in range(1, 31) if ep.due(job, s, say)] == [5, 10, 15, 20, 25, 30]  # 10: for the notice too
    assert len(say.lines) == 1 and "being preempted (no deadline): checkpoint at step 10 of 60" in say.lines[0]
    notices.append(ray.train.PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"n2": [0]}))
    assert ep.due(job, 40, say) and len(say.lines) == 2  # another node: said and checkpointed again
    job.cfg = small_cfg(tmp_path, "checkpoint.every_minutes=1", "data.batch_size=24")
    ep.last_save -= 61
    assert [s for s in range(41, 61) if ep.due(job, s, say)] == [50]  # asked at the notices' steps only


def test_a_checkpoint_within_an_epoch_resumes_its_rows_left_unless_the_batch_size_changed(tmp_path, monkeypatch):
    """Epoch from a checkpoint taken after 20 steps of epoch 2 (batch 24, 2 workers): with the same
    batch size a worker trains only the rows left, with the sums so far; with another, the steps
    and rows of the checkpoint mean nothing, and the epoch starts over, said on the console."""
    import types

    import numpy as np
    import ray.train.collective
    import torch
    from pipelines import plan
    from pipelines.train import Epoch

    monkeypatch.setattr(ray.train.collective, "broadcast_from_rank_zero", lambda value: value)
    units = plan.read_units([("a", 0, [256] * 5 + [181])])  # 1,461 rows: 60 steps of 24
    cfg = small_cfg(tmp_path, "data.batch_size=24")
    done = np.zeros(1461, bool)
    done[plan.epoch_order(units, cfg.run.seed, 2)[:20 * 24]] = True  # the first 20 steps, both workers
    partial = {"steps": 20, "done": torch.from_numpy(plan.pack(done)), "sums": [1.0] * 6, "batch": 24,
               "rows": 1461, "workers": 2}
    job = types.SimpleNamespace(cfg=cfg, info={"train_rows": 1461, "units": units}, world=2, rank=0, epoch=1,
                                history=[], partial=partial, preemption=None)
    say = types.SimpleNamespace(lines=[])
    say.line = say.lines.append
    ep = Epoch(job, say)
    assert (ep.epoch, ep.start, ep.carried, len(ep.rows)) == (2, 20, [1.0] * 6, 40 * 12)
    assert not done[ep.rows].any() and not say.lines
    job.cfg = small_cfg(tmp_path, "data.batch_size=48")
    ep = Epoch(job, say)
    assert (ep.epoch, ep.start, ep.carried, len(ep.rows)) == (2, 0, [0.0] * 6, 30 * 24)
    assert say.lines == ["the checkpoint within epoch 2 was written with data.batch_size=24 over 1461 images, "
                         "now 48 over 1461: epoch 2 starts over"]


def test_the_next_epoch_started_early_is_taken_only_for_the_rows_it_read(tmp_path, monkeypatch):
    """Upcoming: the next epoch's rows start on their way before this epoch's checkpoint (during its
    validation when images are decoded on the device); that epoch takes them when its rows are those
    (a run resumed within it reads only the rows left)."""
    import types

    from pipelines import plan, train

    class Batches:
        closed = False

        def close(self):
            self.closed = True

    started = []
    monkeypatch.setattr(train, "training_batches",
                        lambda job, epoch, rows: started.append((epoch, len(rows))) or Batches())
    cfg = small_cfg(tmp_path, "data.batch_size=24", "schedule.epochs=3", "schedule.milestones=[]")
    units = plan.read_units([("a", 0, [256] * 5 + [181])])  # 1,461 rows: 60 steps of 24
    job = types.SimpleNamespace(cfg=cfg, info={"train_rows": 1461, "units": units}, world=2, rank=1, epoch=1)
    upcoming = train.Upcoming.start(job)
    assert started == [(2, 60 * 12)]
    rows = plan.worker_rows(units, cfg.run.seed, 2, 24, 2, 1)
    assert upcoming.take(2, rows) is upcoming.batches and not upcoming.batches.closed

    upcoming = train.Upcoming.start(job)
    done = np.zeros(1461, bool)
    done[plan.worker_rows(units, cfg.run.seed, 2, 24, 2, 0)[:120]] = True  # rank 0's first 10 steps
    done[rows[:120]] = True
    assert upcoming.take(2, plan.worker_rows(units, cfg.run.seed, 2, 24, 2, 1, done, 10)) is None
    assert upcoming.batches.closed
    job.epoch = 3
    assert train.Upcoming.start(job) is None  # the last epoch is done: nothing comes next
    assert train.Upcoming.during_validation(small_cfg(tmp_path, "data.decode=gpu"))
    assert not train.Upcoming.during_validation(small_cfg(tmp_path, "data.decode=cpu"))


def test_the_epoch_logger_on_rays_controller_uses_the_drivers_mlflow_settings(tmp_path, monkeypatch):
    """LogEpochs runs in Ray Train's controller, a process with its Ray node's environment: on a
    cluster the driver joined, without the driver's MLFLOW_TRACKING_TOKEN. It brings the driver's."""
    import pickle
    from types import SimpleNamespace
    import pipelines.train as T
    from pipelines.runtime import driver_settings
    from pipelines.shards import fs_and_path
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "from-the-driver")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("RAY_ADDRESS", "not-a-setting-to-hand-over")
    settings = driver_settings()
    assert {"MLFLOW_TRACKING_TOKEN", "HTTPS_PROXY"} <= set(settings) and "RAY_ADDRESS" not in settings
    callback = pickle.loads(pickle.dumps(T.LogEpochs("http://tracking:5000", "run", fs_and_path(str(tmp_path)), None,
                                                     settings)))  # as Ray hands it to its controller
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")  # the controller's own environment
    seen = []

    class Log:
        def __init__(self, uri, run_id):
            seen.append(os.environ.get("MLFLOW_TRACKING_TOKEN"))

        def log(self, rows):
            seen.append(rows[0]["epoch"])

    monkeypatch.setattr(T, "EpochLog", Log)
    callback.after_report(None, [{"epoch": 1, "val_error": 0.5}], SimpleNamespace(path=f"{tmp_path}/checkpoint_x"))
    assert seen == ["from-the-driver", 1]
