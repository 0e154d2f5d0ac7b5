"""cluster/: the launcher configs pass Ray's schema and Ray's own config preparation; the KubeRay
manifests, the Dockerfile and the runtime env carry what matters (versions, GPUs, shared storage,
Secrets, token auth, nothing public); the Grafana dashboard refers only to metrics this project or
Ray exports; and cluster/local.sh starts three nodes that run a submitted one-epoch training and
serve the project's gauges, which a real Prometheus, finding the nodes through Ray's
service-discovery file, answers every dashboard query about."""
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
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

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
    gpus = cfg.scaling.max_workers * cfg.scaling.gpus_per_worker
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


PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary: apt-get install prometheus (.ci/run installs it)")
SCRAPE_S = 1  # Prometheus's scrape interval here: a one-epoch job's gauges live for seconds


def start_prometheus(state: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus with the config Ray writes for the head's session (the one `local.sh up` prints:
    file_sd at Ray's service-discovery file), scraping every SCRAPE_S seconds."""
    config = yaml.safe_load(Path(state, "n0/session_latest/metrics/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{SCRAPE_S}s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port_block(1)}"
    with open(tmp_path / "prometheus.log", "w") as log:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address={url.removeprefix('http://')}"],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=5)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError("prometheus did not start: " + (tmp_path / "prometheus.log").read_text()[-2000:])
            time.sleep(0.5)


def prom(url: str, api: str, **params) -> list | dict:
    """The data of Prometheus's HTTP API answer; ValueError with Prometheus's error if it has none."""
    try:
        body = urllib.request.urlopen(f"{url}/api/v1/{api}?{urllib.parse.urlencode(params)}", timeout=30).read()
    except urllib.error.HTTPError as e:  # 400 / 422: a query that does not parse or evaluate
        body = e.read()
    answer = json.loads(body)
    if answer["status"] != "success":
        raise ValueError(f"{answer['errorType']}: {answer['error']}")
    return answer["data"]


@pytest.fixture(scope="module")
def local3(tmp_path_factory, mlflow_template):
    """cluster/local.sh up with three nodes, a one-epoch training submitted to it (run.name local3)
    and scraped while it runs (its nodes' endpoints, and a real Prometheus where one is installed),
    then local.sh down: what the tests check, recorded."""
    tmp_path = tmp_path_factory.mktemp("local3")
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(mlflow_template, home / "mlflow.db")  # a new store, its schema made once (conftest)
    env = {**os.environ, "RAY_RESNET_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_RESNET_BIN": str(bin_dir)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    state = tempfile.mkdtemp(prefix="rrl-", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port_block(30)
    local = [str(CLUSTER / "local.sh")]
    opts = ["--state", state]
    run = SimpleNamespace(port=port, prometheus=None, ranks={}, home=home)
    prometheus = None
    try:
        try:
            up = subprocess.run(local + ["up", "--workers", "2", "--port", str(port)] + opts, env=env,
                                capture_output=True, text=True, timeout=300)
            assert up.returncode == 0, up.stdout + up.stderr
            status = subprocess.run(local + ["status"] + opts, env=env, capture_output=True, text=True, timeout=120)
            assert "3 node(s) alive" in status.stdout, status.stdout + status.stderr
            variables = dict(line.split("=", 1) for line in Path(state, "env").read_text().splitlines())
            run.address, run.metrics = variables["RAY_ADDRESS"], variables["RAY_RESNET_LOCAL_METRICS"].split()
            provisioning = yaml.safe_load(Path(state, "n0/session_latest/metrics/grafana/provisioning/dashboards/"
                                               "default.yml").read_text())
            run.dashboards = {p.name for p in Path(provisioning["providers"][0]["options"]["path"]).iterdir()}
            run.session = Path(state, "n0/session_latest").resolve().name  # the series' SessionName
            if PROMETHEUS:
                prometheus, run.prometheus = start_prometheus(state, tmp_path)

            # Each rank's gauges on its own node's Prometheus endpoint, scraped while the job runs: Ray
            # drops a gauge a few seconds after the process that set it ends
            def scrape_gauges():
                for url in run.metrics:
                    scrape = urllib.request.urlopen(url, timeout=30).read().decode()
                    for gauge in project_gauges():
                        for labels in re.findall(rf'^{gauge}\{{(.*?)\}} \S+$', scrape, re.M):
                            if 'run="local3"' in labels:
                                run.ranks.setdefault(gauge, {})[re.search(r'rank="(\d+)"', labels).group(1)] = url

            started = time.time()
            for _ in range(30):  # `up` waits for the head's agent; a retry covers a slow registration
                job = subprocess.Popen(
                    [bin_dir / "ray", "job", "submit", "--address", run.address, "--runtime-env",
                     f"{state}/runtime_env.yaml", "--", "python", "-m", "pipelines.train", "--config",
                     "ray_config.yaml", "model.depth=8", "schedule.epochs=1", "schedule.milestones=[]",
                     "data.batch_size=64", "data.shuffle_buffer=256", "scaling.num_workers=2",
                     "scaling.placement_strategy=STRICT_SPREAD", "run.name=local3"],
                    cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                deadline = time.time() + 400
                while job.poll() is None and time.time() < deadline:
                    scrape_gauges()
                    time.sleep(2)
                run.log = job.communicate(timeout=30)[0]
                if "No available agent" not in run.log:
                    break
                time.sleep(2)
            run.job_returncode, run.window = job.returncode, (started, time.time())
            run.checkpoints = list((home / "runs" / "local3").glob("checkpoint_*"))  # the nodes' RAY_RESNET_HOME
            if prometheus:
                run.targets = prom(run.prometheus, "targets", state="active")["activeTargets"]
        finally:
            run.down = subprocess.run(local + ["down"] + opts, env=env, capture_output=True, text=True, timeout=180)
            run.left = processes_under(state + "/")
            shutil.rmtree(state, ignore_errors=True)
        # Prometheus keeps the job's series after `down`: the dashboard's queries run over its window
        yield run
    finally:
        if prometheus:
            prometheus.terminate()
            prometheus.wait(timeout=30)


def test_local_cluster_of_three_nodes_runs_a_submitted_training_and_serves_the_gauges(local3):
    assert local3.address == f"http://127.0.0.1:{local3.port + 1}" and len(local3.metrics) == 3
    # Ray provisions its dashboards' folder for Grafana, and ours is in it
    assert {"default_grafana_dashboard.json", "ray_resnet_grafana_dashboard.json"} <= local3.dashboards
    assert local3.job_returncode == 0 and "succeeded" in local3.log, local3.log[-3000:]
    assert "2 workers on 2 node(s)" in local3.log, local3.log[-3000:]  # STRICT_SPREAD: one worker per node
    assert any(p.is_dir() for p in local3.checkpoints)  # checkpoint folders, not only Ray's snapshot
    assert set(local3.ranks) == project_gauges(), local3.ranks
    for gauge, where in local3.ranks.items():
        assert set(where) == {"0", "1"} and len(set(where.values())) == 2, (gauge, where)
    assert local3.down.returncode == 0, local3.down.stdout + local3.down.stderr
    assert not local3.left, f"processes left running: {local3.left}"

    # The job's driver ran on the head (from the uploaded working dir): its MLflow run, in the
    # store under RAY_RESNET_HOME (outside the upload), has its epoch and says it came from a job
    from mlflow import MlflowClient
    from pipelines.checkpoint import load_state
    state = load_state(str(max(p for p in local3.checkpoints if p.is_dir())))
    client = MlflowClient(f"sqlite:///{local3.home / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(state["mlflow_run_id"], "val_error")] == [1]
    submitted = client.get_run(state["mlflow_run_id"])
    assert submitted.data.params["model.name"] == "cifar_resnet8"
    tags = submitted.data.tags
    assert tags["mlflow.source.type"] == "JOB" and tags["ray.job_submission_id"].startswith("raysubmit_")
    assert tags["mlflow.source.name"] == "pipelines.train"


def grafana_regex_escape(value: str) -> str:
    """Grafana's prometheusSpecialRegexEscape: a chosen value of a multi-value or All variable,
    inside a PromQL string that is a regex."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m[0], value.replace("\\", "\\\\\\\\"))


def expand(text: str, values: dict[str, str]) -> str:
    """Grafana's $name and ${name}; one it does not know stays as written, to be caught."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def dashboard_queries(run) -> list[tuple[str, str, bool]]:
    """(panel title, expression as Grafana sends it, whether it reads Ray's GPU metrics) for each
    query of the shipped dashboard, its variables resolved as Grafana resolves them through
    Prometheus: SessionName the cluster's session, Run the job's run, every other one All."""
    dashboard = json.loads((CLUSTER / "grafana" / "ray_resnet_grafana_dashboard.json").read_text())
    start, end = run.window
    # Grafana's built-ins for a data source with this scrape interval, at a step of one scrape:
    # $__interval the step, $__rate_interval max(step + scrape interval, 4 scrape intervals)
    values = {"__interval": f"{SCRAPE_S}s", "__rate_interval": f"{4 * SCRAPE_S}s"}
    chosen = {"SessionName": run.session, "Run": "local3"}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":  # the datasource: panels' data source, in no expression
            continue
        name, query = variable["name"], expand(variable["query"]["query"], values)
        label_values = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", query)
        assert label_values, f"variable {name}: {query} is not label_values(...)"
        params = {"start": start, "end": end, **({"match[]": label_values[1]} if label_values[1] else {})}
        options = prom(run.prometheus, f"label/{label_values[2]}/values", **params)
        if name in chosen:
            assert chosen[name] in options, f"variable {name} ({query}) offers {options}, not {chosen[name]}"
            values[name] = grafana_regex_escape(chosen[name])
        else:
            assert options, f"variable {name} ({query}) offers nothing"
            values[name] = variable.get("allValue") or "(" + "|".join(map(grafana_regex_escape, options)) + ")"
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = expand(target["expr"], values)
            assert "$" not in expr, f"{panel['title']}: a variable Grafana would fill in is left: {expr}"
            queries.append((panel["title"], expr, any(re.match(r"ray_node_(gpus|gram)_", m)
                                                      for m in metric_names(target["expr"]))))
    return queries


def unanswered(run, queries: list[tuple[str, str, bool]]) -> list[str]:
    """'title: expression: why' for each query that fails to parse or evaluate, returns no series
    over the job's run, or returns one that is not the job's run or one of the cluster's nodes."""
    nodes = {url.split("/")[2] for url in run.metrics}
    failed = []
    for title, expr, _ in queries:
        try:
            series = prom(run.prometheus, "query_range", query=expr, start=run.window[0], end=run.window[1],
                          step=SCRAPE_S)["result"]
        except ValueError as e:
            failed.append(f"{title}: {expr}: {e}")
            continue
        strangers = [s["metric"] for s in series if s["metric"].get("run") not in {None, "local3"}
                     or s["metric"].get("instance") not in nodes | {None}]
        if not series or strangers:
            failed.append(f"{title}: {expr}: {'series of another run or node: ' + str(strangers) if series else 'no series'}")
    return failed


@needs_prometheus
def test_prometheus_on_rays_service_discovery_answers_every_dashboard_query_for_the_running_job(local3):
    assert local3.job_returncode == 0, local3.log[-3000:]
    # Ray's service-discovery file names every node's metrics endpoint, and Prometheus scrapes them
    scraped = {t["scrapeUrl"] for t in local3.targets if t["health"] == "up"}
    assert set(local3.metrics) <= scraped, local3.targets
    cpu_queries = [q for q in dashboard_queries(local3) if not q[2]]
    assert cpu_queries
    failed = unanswered(local3, cpu_queries)
    assert not failed, "dashboard queries without an answer:\n" + "\n".join(failed)


@needs_prometheus
def test_the_dashboards_gpu_queries_answer_where_the_cluster_has_gpus(local3):
    resources = prom(local3.prometheus, "query_range", query=f'ray_resources{{SessionName="{local3.session}"}}',
                     start=local3.window[0], end=local3.window[1], step=SCRAPE_S)["result"]
    assert any(s["metric"].get("Name") == "CPU" for s in resources)  # the metric that would show GPUs
    gpu_queries = [q for q in dashboard_queries(local3) if q[2]]
    if not any(s["metric"].get("Name") == "GPU" for s in resources):
        pytest.skip("no GPU in the cluster (Ray's ray_resources has none), so no GPU metric: not checked: "
                    + "; ".join(sorted({title for title, _, _ in gpu_queries})))
    failed = unanswered(local3, gpu_queries)
    assert not failed, "GPU dashboard queries without an answer:\n" + "\n".join(failed)
