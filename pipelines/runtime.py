"""Ray itself: starting or joining a cluster, checking it can hold a job, what a job or trial
takes, and the few Ray internals this project depends on.

    start_ray(cfg)       # join RAY_ADDRESS, or start Ray here; quiet unless run.verbose
    check_cluster(cfg)   # refuse a job the cluster cannot hold, before it waits forever

The decode-CPU rule lives here alone: a training job takes its workers' CPUs and GPUs, plus
DECODE_CPUS for Ray Data's decoding tasks (without one, the input never arrives).
"""
from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

from pipelines.config import Config, ConfigError, SetupError
from pipelines.ray_internals import setup_process

DECODE_CPUS = 1   # kept free for Ray Data's decode tasks, per training job (per trial in a sweep)
TRIAL_CPU = 0.01  # a sweep's trial function only waits on its TorchTrainer, which holds the real resources
# Every process Ray starts for this job runs this first (runtime_env worker_process_setup_hook).
SETUP_HOOK = "pipelines.ray_internals.setup_process"
# What a process of Ray's that acts for the driver reads as the driver does: object storage
# (pipelines.shards.fs_and_path; MLflow's boto3: endpoint, region, keys, profile), the tracking
# server (MLflow's token or password, Databricks'), and the way out to them (proxies, certificate
# bundles, a GCS emulator).
DRIVER_ENV = ("AWS_", "GOOGLE_", "MLFLOW_", "DATABRICKS_")
DRIVER_ENV_NAMES = {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
                    "CURL_CA_BUNDLE", "CLOUD_STORAGE_EMULATOR_ENDPOINT"}


def driver_settings() -> dict[str, str]:
    """This process's DRIVER_ENV settings, for the processes of Ray's that act for it (a sweep's
    trial functions, Ray Train's controller logging epochs to MLflow). Those start with their Ray
    node's environment, which on a cluster the driver joined is not the driver's. They get these
    through Ray's object store, never a runtime env, which Ray's dashboard shows and its agent logs."""
    return {k: v for k, v in os.environ.items() if k.startswith(DRIVER_ENV) or k.upper() in DRIVER_ENV_NAMES}


def job_resources(cfg: Config, workers: int | None = None) -> tuple[float, float]:
    """(CPUs, GPUs) a training job needs of the cluster: its workers (the most it may have), and the
    decode CPU."""
    sc = cfg.scaling
    w = sc.max_workers if workers is None else workers
    return w * sc.cpus_per_worker + DECODE_CPUS, w * sc.gpus_per_worker


def trial_resources(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) one sweep trial holds: its training job and its trial function."""
    cpus, gpus = job_resources(cfg)
    return cpus + TRIAL_CPU, gpus


def local_cpus(cfg: Config) -> int:
    """Logical CPUs for a Ray started here: the machine's, and at least what the job needs (a
    laptop's two cores can host two 1-CPU workers and the decode tasks: they share the cores)."""
    return max(os.cpu_count() or 1, math.ceil(job_resources(cfg)[0]) + 1)


def check_cluster(cfg: Config) -> None:
    """Refuse, instead of waiting forever, a job the cluster cannot hold (an elastic one: its minimum)."""
    import ray
    total = ray.cluster_resources()
    sc = cfg.scaling
    cpus, gpus = job_resources(cfg, sc.min_workers)
    have_cpus, have_gpus = total.get("CPU", 0), total.get("GPU", 0)
    if gpus > have_gpus:
        raise ConfigError(f"scaling.gpus_per_worker={sc.gpus_per_worker} x scaling.num_workers={sc.min_workers}: "
                          f"needs {gpus:g} GPUs, the cluster has {have_gpus:g}; lower them, or set "
                          "gpus_per_worker=0 to train on CPUs")
    if cpus > have_cpus:
        raise ConfigError(f"scaling.cpus_per_worker={sc.cpus_per_worker:g} x scaling.num_workers={sc.min_workers}: "
                          f"training takes {cpus - DECODE_CPUS:g} of the cluster's {have_cpus:g} CPUs and Ray Data "
                          f"needs at least {DECODE_CPUS} more to decode; lower them or add nodes")


def start_ray(cfg: Config) -> str | None:
    """Join the cluster in RAY_ADDRESS (`ray job submit` sets it; `RAY_ADDRESS=auto` joins the one
    `ray start` made here); otherwise start Ray in this process. Unless run.verbose, Ray's own
    lines (its start-up, its workers' output) stay in its log files. Returns a line saying which
    Ray, its dashboard and its logs; None when this process had joined one already."""
    import ray
    setup_process()
    if ray.is_initialized():
        return None
    quiet = not cfg.run.verbose
    options = {"log_to_driver": not quiet, "runtime_env": {"worker_process_setup_hook": SETUP_HOOK}}
    if quiet:  # Ray's start-up notices (token auth, "Started a local Ray instance"); its warnings later on show
        options["logging_level"] = logging.ERROR
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if "RAY_AUTH_MODE" not in os.environ and Path("~/.ray/auth_token").expanduser().exists():
            os.environ["RAY_AUTH_MODE"] = "token"  # clusters from `ray start` (Ray 2.60) require the token
        host, _, port = address.rpartition(":")
        if "://" not in address and port.isdigit():  # Ray retries a dead address for minutes
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except OSError as e:
                raise SetupError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or e}); "
                                 "start one (`ray start --head`), or unset RAY_ADDRESS to start Ray here") from None
        context, how = ray.init(address=address, **options), f"joined {address}"
    else:
        cpus, cores = local_cpus(cfg), os.cpu_count() or 1
        how = (f"started here with {cpus} logical CPUs (what the job needs) on a machine with {cores}"
               if cpus > cores else f"started here with {cpus} CPUs")
        context = init_local_ray(num_cpus=cpus, **options)
    if quiet:
        logging.getLogger("ray").setLevel(logging.WARNING)
    return describe(context, how, quiet)


def describe(context, how: str, quiet: bool) -> str:
    dashboard = f"; dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    logs = f"{context.address_info.get('session_dir', '/tmp/ray/session_latest')}/logs"
    return (f"Ray: {how}{dashboard}; its own log lines in {logs}"
            + (" (--verbose shows them here)" if quiet else ""))


def init_local_ray(**options):
    """ray.init a new local instance whose processes ask their own dashboard's state API.

    Ray Train's placement-group cleaner looks the cluster up from the machine's Ray instances; with
    two on one machine (a test cluster beside a `ray start`) it raises "Found multiple active Ray
    instances", and a trial stopped by ASHA or a killed run then keeps its workers' CPUs. The
    processes ray.init starts inherit this environment, so naming the dashboard while it starts
    them pins them to this instance; afterwards the variable goes, lest this process's children
    (another cluster's `ray start`) inherit it too.
    """
    import ray
    port = free_port()
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    options.setdefault("runtime_env", {"worker_process_setup_hook": SETUP_HOOK})
    try:
        return ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 **options)
    finally:
        if before is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
