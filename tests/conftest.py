import os
import sys
import tempfile
from pathlib import Path

import pytest

# Before any project import: runs, MLflow and the digits shards go to a throwaway home.
os.environ["RAY_RESNET_HOME"] = tempfile.mkdtemp(prefix="ray-resnet-tests-")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ray_config.yaml"


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m MODULE ARGS` from the checkout with a private home; returns the process."""
    import subprocess

    def run(module: str, *args: str, timeout: float = 300, env: dict | None = None, wait: bool = True):
        env = {**os.environ, "RAY_RESNET_HOME": str(tmp_path / "home"), **(env or {})}
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
