"""cluster/: the launcher configs pass Ray's schema and Ray's own config preparation; the KubeRay
manifests, the Dockerfile and the runtime env carry what matters (versions, GPUs, shared storage,
Secrets, token auth, nothing public); the Grafana dashboard refers only to metrics this project or
Ray exports; and cluster/local.sh starts three nodes that run a submitted one-epoch training and
serve the project's gauges."""
import copy
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIG, ROOT

CLUSTER = ROOT / "cluster"
RAY_VERSION = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"  # the interpreter the tests run on
PROJECT_VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
SHARED = "/mnt/cluster_storage"
RUNTIME_ENV = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def project_gauges() -> set[str]:
    """The Prometheus names of pipelines/tracking.py's gauges (Ray prefixes "ray_")."""
    from pipelines.tracking import Gauges
    return {f"ray_{g._name}" for g in Gauges("any", 0).gauges.values()}


def metric_names(text: str) -> set[str]:
    """ray_* series names in PromQL: before a selector or as label_values' argument."""
    return set(re.findall(r"\b(ray_[a-z0-9_]+)\s*\{", text)) | set(re.findall(r"label_values\((ray_[a-z0-9_]+)", text))


# ---------------------------------------------------------------------------------------------
# Cluster launcher configs

@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_rays_schema_and_config_preparation(name):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before calling the cloud
    validate_config(prepared)

    # Images of the tested Ray and Python: a CPU head, GPU workers
    assert config["docker"]["head_image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-cpu"
    assert config["docker"]["worker_image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
    assert f"{SHARED}:{SHARED}" in " ".join(config["docker"]["run_options"])

    # Autoscaling 8-GPU worker types, none kept running; the head takes no tasks
    types = prepared["available_node_types"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert len(workers) >= 2 and types[config["head_node_type"]]["resources"] == {"CPU": 0}
    for t in workers.values():
        assert t["resources"]["GPU"] == 8 and 0 == t["min_workers"] < t["max_workers"] <= config["max_workers"]

    # This checkout installed with exactly the tested packages, on every node
    assert config["file_mounts"]["~/ray-resnet"] == "." and config["rsync_filter"] == [".gitignore"]
    assert "pip install --quiet -c ~/ray-resnet/constraints.txt ~/ray-resnet" in prepared["worker_setup_commands"]
    assert any("ray==$(python -c 'import ray; print(ray.__version__)')" in c for c in config["setup_commands"])

    # Token auth on every node with the token copied from this machine; the dashboard on the
    # head's loopback only; no firewall rule of ours
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head, worker = (" ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    for start in (head, worker):
        assert "RAY_AUTH_MODE=token" in start and f"RAY_RESNET_HOME={RUNTIME_ENV['env_vars']['RAY_RESNET_HOME']}" in start
    ray_start = head[head.index("ray start --head"):]
    assert "--dashboard-host=127.0.0.1" in ray_start and "0.0.0.0" not in ray_start
    # MLflow on the head's loopback: only processes on the driver's node (the head) talk to it
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in head and "MLFLOW_TRACKING_URI" not in worker
    assert "mlflow server --host 127.0.0.1 " in head
    # the shared storage: the cluster's user only, never world-writable
    storage = " ".join(config["initialization_commands"])
    assert "chmod 1777" not in storage and "sudo chmod 750 /mnt/cluster_storage/ray-resnet" in storage
    assert "security_group" not in config["provider"]

    # Every command is valid shell
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        for command in config[key]:
            assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
    # the values to fill in fail fast and the README names them
    readme = (CLUSTER / "README.md").read_text()
    for marker in set(re.findall(r"[\w-]*CHANGEME[\w-]*", (CLUSTER / name).read_text())):
        assert marker in readme, marker


def test_aws_efs_is_in_the_clusters_region():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    efs = re.search(r"EFS=(\S+);", config["initialization_commands"][0]).group(1)
    assert efs.endswith(f".efs.{config['provider']['region']}.amazonaws.com")


# ---------------------------------------------------------------------------------------------
# KubeRay

def kuberay(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def check_ray_cluster_spec(spec: dict, shared_claim: str) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-resnet-auth"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    for g in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 2
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        assert container["image"].endswith(f"/ray-resnet:{PROJECT_VERSION}")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == shared_claim
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_RESNET_HOME"]["value"] == RUNTIME_ENV["env_vars"]["RAY_RESNET_HOME"]
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {"name": "ray-resnet-mlflow",
                                                                           "key": "MLFLOW_TRACKING_URI"}
        for credential in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[credential]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert "value" not in env["MLFLOW_TRACKING_URI"]


def test_kuberay_raycluster_and_rayjob_carry_gpus_shared_storage_secrets_and_token_auth():
    docs = kuberay("raycluster.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "RayCluster"}
    pvc = kinds["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert kinds["RayCluster"]["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(kinds["RayCluster"]["spec"], pvc["metadata"]["name"])

    (job,) = kuberay("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"], pvc["metadata"]["name"])
    # the entrypoint is a valid training command: its config and overrides load
    from pipelines.config import load_config
    args = job["spec"]["entrypoint"].split()
    assert args[:5] == ["python", "-m", "pipelines.train", "--config", "/home/ray/ray-resnet/ray_config.yaml"]
    cfg = load_config(CONFIG, args[5:])
    gpus = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
    assert cfg.model.name == "resnet50" and gpus == 8 * job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]

    (monitor,) = kuberay("monitoring.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == kinds["RayCluster"]["metadata"]["labels"]


def test_the_image_is_rays_for_the_tested_ray_and_python_with_the_project_installed():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"]
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile
    assert f"ray-resnet:{PROJECT_VERSION}" in dockerfile


def test_no_secret_and_nothing_public_in_the_shipped_configs():
    texts = {p: p.read_text() for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in {".yaml", ".sh", ".json", ""}}
    for path, text in texts.items():
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY|AKIA[0-9A-Z]{16}|auth_token\W{1,4}[0-9a-f]{16,}", text), path
        for doc in (yaml.safe_load_all(text) if path.suffix == ".yaml" else []):
            if isinstance(doc, dict) and "kind" in doc:
                assert doc["kind"] not in {"Secret", "Ingress"}, path
                assert doc.get("spec", {}).get("type") not in {"LoadBalancer", "NodePort"}, path
        assert "--dashboard-host=0.0.0.0" not in text and "0.0.0.0/0" not in text, path


# ---------------------------------------------------------------------------------------------
# Job submission

def test_the_runtime_env_is_valid_for_ray_and_uploads_only_what_jobs_need(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**RUNTIME_ENV)  # Ray's own validation of every field
    assert RUNTIME_ENV["working_dir"] == "."
    assert RUNTIME_ENV["env_vars"]["RAY_RESNET_HOME"].startswith(SHARED + "/")
    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=RUNTIME_ENV["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert {"pipelines/train.py", "pipelines/tune.py", "resnet_models/resnet.py", "ray_config.yaml"} <= set(names)
    for left_out in (".venv/", ".git/", "tests/", "benchmarks/", "cluster/grafana/"):
        assert not any(n.startswith(left_out) for n in names), left_out


# ---------------------------------------------------------------------------------------------
# Grafana

def ray_dashboards() -> dict[str, dict]:
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as f
    makers = [getattr(f, name) for name in dir(f) if name.startswith("generate_") and name.endswith("_dashboard")]
    return {maker.__name__: json.loads(maker()[0]) for maker in makers}


def test_the_grafana_dashboard_is_current_and_refers_only_to_metrics_that_exist():
    out = subprocess.run([sys.executable, str(CLUSTER / "grafana" / "build_dashboard.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (CLUSTER / "grafana" / "ray_resnet_grafana_dashboard.json").read_text()
    dashboard = json.loads(text)

    ray_metrics = set().union(*(metric_names(json.dumps(d)) for d in ray_dashboards().values()))
    ours = project_gauges()
    used = metric_names(text)
    assert used <= ours | ray_metrics, used - ours - ray_metrics
    assert ours <= used  # every gauge the training exports has a panel
    assert {"ray_node_gpus_utilization", "ray_node_gram_used"} <= used
    assert dashboard["uid"] not in {d["uid"] for d in ray_dashboards().values()}

    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("images/s per rank", "loss", "validation error", "data-wait", "gpu utilisation"):
        assert topic in titles, topic
    for panel in dashboard["panels"]:
        assert panel["datasource"] == "${datasource}"
        for target in panel["targets"]:
            assert 'SessionName=~"$SessionName"' in target["expr"]


# ---------------------------------------------------------------------------------------------
# The local multi-node cluster

def free_port_block(size: int) -> int:
    """A base port with `size` free ports after it, below Ray's worker-port range's neighbours."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


def processes_under(prefix: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if prefix.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_local_cluster_of_three_nodes_runs_a_submitted_training_and_serves_the_gauges(tmp_path):
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "home"
    env = {**os.environ, "RAY_RESNET_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_RESNET_BIN": str(bin_dir)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    state = tempfile.mkdtemp(prefix="rrl-", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port_block(30)
    local = [str(CLUSTER / "local.sh")]
    opts = ["--state", state]
    try:
        up = subprocess.run(local + ["up", "--workers", "2", "--port", str(port)] + opts, env=env,
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        status = subprocess.run(local + ["status"] + opts, env=env, capture_output=True, text=True, timeout=120)
        assert "3 node(s) alive" in status.stdout, status.stdout + status.stderr
        variables = dict(line.split("=", 1) for line in Path(state, "env").read_text().splitlines())
        address, metrics = variables["RAY_ADDRESS"], variables["RAY_RESNET_LOCAL_METRICS"].split()
        assert address == f"http://127.0.0.1:{port + 1}" and len(metrics) == 3

        # Ray provisions its dashboards' folder for Grafana, and ours is in it
        provisioning = yaml.safe_load(Path(state, "n0/session_latest/metrics/grafana/provisioning/dashboards/"
                                           "default.yml").read_text())
        folder = Path(provisioning["providers"][0]["options"]["path"])
        assert {"default_grafana_dashboard.json", "ray_resnet_grafana_dashboard.json"} <= {p.name for p in folder.iterdir()}

        # Each rank's gauges on its own node's Prometheus endpoint, scraped while the job runs: Ray
        # drops a gauge a few seconds after the process that set it ends
        ranks = {}

        def scrape_gauges():
            for url in metrics:
                scrape = urllib.request.urlopen(url, timeout=30).read().decode()
                for gauge in project_gauges():
                    for labels in re.findall(rf'^{gauge}\{{(.*?)\}} \S+$', scrape, re.M):
                        if 'run="local3"' in labels:
                            ranks.setdefault(gauge, {})[re.search(r'rank="(\d+)"', labels).group(1)] = url

        for _ in range(30):  # `up` waits for the head's agent; a retry covers a slow registration
            job = subprocess.Popen(
                [bin_dir / "ray", "job", "submit", "--address", address, "--runtime-env", f"{state}/runtime_env.yaml",
                 "--", "python", "-m", "pipelines.train", "--config", "ray_config.yaml", "model.depth=8",
                 "schedule.epochs=1", "schedule.milestones=[]", "data.batch_size=64", "data.shuffle_buffer=256",
                 "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD", "run.name=local3"],
                cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            deadline = time.time() + 400
            while job.poll() is None and time.time() < deadline:
                scrape_gauges()
                time.sleep(2)
            log = job.communicate(timeout=30)[0]
            if "No available agent" not in log:
                break
            time.sleep(2)
        assert job.returncode == 0 and "succeeded" in log, log[-3000:]
        assert "2 workers on 2 node(s)" in log, log[-3000:]  # STRICT_SPREAD: one worker per node
        assert list((home / "runs" / "local3").glob("checkpoint_*"))  # under the nodes' RAY_RESNET_HOME
        assert set(ranks) == project_gauges(), ranks
        for gauge, where in ranks.items():
            assert set(where) == {"0", "1"} and len(set(where.values())) == 2, (gauge, where)
    finally:
        down = subprocess.run(local + ["down"] + opts, env=env, capture_output=True, text=True, timeout=180)
        left = processes_under(state + "/")
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not left, f"processes left running: {left}"
