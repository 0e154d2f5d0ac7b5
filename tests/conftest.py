import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Before any project import: runs, MLflow and the digits shards go to a throwaway home.
os.environ["RAY_RESNET_HOME"] = tempfile.mkdtemp(prefix="ray-resnet-tests-")
# Ray Train's controller looks at its workers every 2 s by default, and a finished run ends at its
# next look: 2-3 s a run, over the suite's dozens of runs. Every Ray process started here inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray_config.yaml"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: a new store runs all of MLflow's schema migrations
    (seconds), which each test's own store would repeat. Copies of it are new stores."""
    from mlflow import MlflowClient
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, mlflow_template) -> str:
    """A new, empty MLflow store of this test's own: sqlite:///<tmp_path>/mlflow.db."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def run_cli(tmp_path, mlflow_template):
    """Run `python -m MODULE ARGS` from the checkout with a private home (its MLflow store, when no
    mlflow.tracking_uri is given, a new one at home/mlflow.db); returns the process."""
    import subprocess

    def run(module: str, *args: str, timeout: float = 300, env: dict | None = None, wait: bool = True):
        home = tmp_path / "home"
        env = {**os.environ, "RAY_RESNET_HOME": str(home), **(env or {})}
        if not (home / "mlflow.db").exists() and not any(a.startswith("mlflow.tracking_uri=") for a in args) \
                and "MLFLOW_TRACKING_URI" not in env:
            home.mkdir(exist_ok=True)
            shutil.copy(mlflow_template, home / "mlflow.db")
        if not wait:  # a running process, stdout and stderr together
            return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray costs 5-10 s).

    5 logical CPUs on any machine: two 1-CPU Train workers must leave CPUs for Ray Data's decode
    tasks, or the input never arrives; and two sweep trials of one worker each (2.01 CPUs) fit at
    once. With the dashboard: Ray Train's placement-group cleaner asks its state API, and without
    it a trial stopped by ASHA leaks its workers' CPUs.
    """
    import ray
    from pipelines.runtime import init_local_ray
    if not ray.is_initialized():
        init_local_ray(num_cpus=5, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a filesystem of its own, `small_disk(bytes)`, to fill up (a tmpfs: needs root)."""
    import subprocess
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"cannot mount a small tmpfs to fill up here: {out.stderr.strip()}")
        mounted.append(where)
        return where
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
