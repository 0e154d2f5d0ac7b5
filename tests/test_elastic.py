"""Elastic, preemption-aware training on a cluster of four Ray nodes on this machine
(ray.cluster_utils): a node drained for preemption, a node joining, a node lost without warning,
one run through them all; every image trained once per epoch, by the recipe's batch and lr."""
import json
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import CONFIG


BATCH, ROWS = 24, 1437  # the bundled digits' training split
STEPS = ROWS // BATCH
# Enough epochs that the run with 2 workers outlasts Ray's look for a new node (its coordinator ticks
# every 20 s, then resize_interval_s): with 2 epochs, one CI run ended before growing back.
EPOCHS = 4


class Output:
    """A process's output lines, read as they come."""

    def __init__(self, proc):
        self.proc, self.lines, self.t0 = proc, [], time.monotonic()
        threading.Thread(target=lambda: [self.lines.append(line.rstrip("\n")) or print(
            f"{time.monotonic() - self.t0:6.1f} {line.rstrip()}") for line in proc.stdout], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> int:
        """The index of the first line from `after` matching pattern; fails the test on timeout or exit."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, line in enumerate(self.lines[after:], after):
                if re.search(pattern, line):
                    return i
            if self.proc.poll() is not None and not any(re.search(pattern, x) for x in self.lines[after:]):
                time.sleep(0.5)  # the reader's last lines
                if not any(re.search(pattern, x) for x in self.lines[after:]):
                    pytest.fail(f"exited before {pattern!r}:\n" + "\n".join(self.lines[-60:]))
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} in {timeout} s:\n" + "\n".join(self.lines[-60:]))


def audited_steps(where: Path) -> dict:
    """{(epoch, step): [the rows, lr, workers]} of the steps the final weights contain: an attempt's
    steps past where the next attempt resumed were trained again, and count once, as retrained."""
    attempts = defaultdict(list)
    for f in sorted(where.glob("*.jsonl")):
        attempts[f.name.rsplit("-rank", 1)[0]].append([json.loads(line) for line in f.read_text().splitlines()])
    kept = {}
    for attempt in sorted(attempts):  # named by when it started
        records = [rec for rank in attempts[attempt] for rec in rank]
        resumed = min(tuple(rec["start"]) for rec in records if "start" in rec)
        kept = {k: v for k, v in kept.items() if k <= resumed}
        world = next(rec["world"] for rec in records if "start" in rec)
        for rec in records:
            if "step" in rec:
                rows = kept.get((rec["epoch"], rec["step"]), ([],))[0]
                kept[(rec["epoch"], rec["step"])] = (rows + rec["rows"], rec["lr"], world)
    return kept


def test_lose_a_node_get_one_back_preempt_one_and_keep_every_image_once(tmp_path, run_cli):
    from ray._raylet import GcsClient
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    # One Train worker fits a node (2 of its 3 CPUs), none the head: the decode tasks keep a CPU each.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                                          "health_check_failure_threshold": 3}})
    try:
        nodes = [cluster.add_node(num_cpus=3) for _ in range(3)]
        cluster.wait_for_nodes()
        audit = tmp_path / "audit"
        proc = run_cli("pipelines.train", "--config", str(CONFIG), f"checkpoint.storage_path={tmp_path / 'runs'}",
                       "run.name=elastic", "model.depth=8", "schedule.milestones=[]", f"schedule.epochs={EPOCHS}",
                       f"data.batch_size={BATCH}", "data.shuffle_buffer=64", "scaling.num_workers=[1, 3]",
                       "scaling.cpus_per_worker=2", "scaling.resize_interval_s=2", "checkpoint.every_steps=10",
                       "run.max_failures=1", "mlflow.system_metrics_s=0", "run.progress_s=0", wait=False,
                       env={"RAY_ADDRESS": cluster.address, "RAY_RESNET_AUDIT_ROWS": str(audit),
                            # as this process started the cluster (other tests may have turned tokens on)
                            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
                            # a restart right after a loss may ask for a worker too many (docs/elastic.md)
                            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
        out = Output(proc)
        out.wait_for(r"3 workers on 3 node\(s\)", 180)

        groups = set()

        def a_few_steps_in(world: int, timeout: float = 240):
            """Wait until a new group of world workers has trained two steps."""
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                for f in set(audit.glob("*-rank0.jsonl")) - groups:
                    records = [json.loads(x) for x in f.read_text().splitlines() if x.endswith("}")]  # whole lines
                    if records and records[0]["world"] == world and sum("step" in r for r in records) >= 2:
                        groups.add(f)
                        return
                time.sleep(0.1)
            pytest.fail("no steps:\n" + "\n".join(out.lines[-40:]))

        # 1. A node is drained for preemption with a 15 s deadline: a checkpoint at once, mid-epoch;
        #    at the deadline the node goes, and Ray Train goes on without it, from that checkpoint,
        #    with the two others.
        a_few_steps_in(3)
        drained = nodes.pop(1)
        deadline = time.time() + 15
        accepted, why = GcsClient(address=cluster.address).drain_node(
            drained.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim",
            int(deadline * 1000))
        assert accepted, why
        i = out.wait_for(r"being preempted .*: checkpoint at step [\d,]+ of \d+ of epoch 1", 60)
        assert time.time() < deadline
        time.sleep(max(0.0, deadline - time.time()))
        cluster.remove_node(drained)  # the spot node goes
        i = out.wait_for(r"continuing epoch 1 from step \d+ of \d+ with 2 workers \(its checkpoint was written by 3\)",
                         120, i)

        # 2. A node joins: the group grows back to three (Ray Train looks every resize_interval_s,
        #    its coordinator sees new nodes within 20 s) and training goes on from the latest checkpoint.
        nodes.append(cluster.add_node(num_cpus=3))
        i = out.wait_for(r"3 workers on 3 node\(s\)", 120, i)

        # 3. A node is lost without warning (its processes killed): Ray Train notices, counts it
        #    against run.max_failures (1 here: the drained node did not count), and goes on with two.
        a_few_steps_in(3)
        cluster.remove_node(nodes.pop(0), allow_graceful=False)
        i = out.wait_for(r"worker \d+ failed", 120, i)
        out.wait_for(r"2 workers on 2 node\(s\)", 120, i)
        proc.wait(timeout=300)
        time.sleep(0.5)
        console = "\n".join(out.lines)
        assert proc.returncode == 0, console[-5000:]
        assert f"done: {EPOCHS} epochs" in console
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        cluster.shutdown()

    # Every epoch: each step trained the global batch at the recipe's lr, and every image once,
    # but the epoch's last ROWS mod BATCH in its order.
    steps = audited_steps(audit)
    lr = 0.1 * BATCH / 128
    for epoch in range(1, EPOCHS + 1):
        mine = {s: v for (e, s), v in steps.items() if e == epoch}
        assert sorted(mine) == list(range(1, STEPS + 1)), (epoch, sorted(mine))
        rows = [r for rows, _, _ in mine.values() for r in rows]
        assert all(len(v[0]) == BATCH and v[1] == pytest.approx(lr) for v in mine.values()), epoch
        assert len(rows) == len(set(rows)) == STEPS * BATCH, epoch
    assert {w for _, _, w in steps.values()} == {2, 3}

    # MLflow: the one run, each epoch once, with the workers that ended it
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    run_id = (tmp_path / "runs" / "elastic" / "mlflow_run_id").read_text().strip()
    assert [m.step for m in client.get_metric_history(run_id, "val_error")] == list(range(1, EPOCHS + 1))
    assert {m.value for m in client.get_metric_history(run_id, "workers")} <= {2.0, 3.0}
    # validation split over 2 or 3 workers: every image scored, none twice (val_dropped would go negative)
    assert [m.value for m in client.get_metric_history(run_id, "val_dropped")] == [0] * EPOCHS
