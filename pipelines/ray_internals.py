"""The Ray internals this project depends on, each read or set in one function here with the
reason, and tests/test_runtime.py failing if a Ray upgrade moves one. Nothing happens on import:
setup_process runs in the driver (pipelines.runtime.start_ray) and, through runtime_env's
worker_process_setup_hook, first thing in every process Ray starts for the job. This module
imports nothing of the project's, so those processes start light.
"""
from __future__ import annotations

import contextlib
import logging


def quiet_ray_data() -> None:
    """One table row per epoch on the console: Ray Data's per-execution progress goes to its logs."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # its warning that the progress bars are off, which we just chose, on the first execution
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def setup_process() -> None:
    """Run in this process and, through runtime_env's worker_process_setup_hook, in every process
    Ray starts for the job: Ray Train's actors, the read and decode tasks."""
    shorten_resource_poll()
    quiet_ray_data()


def shorten_resource_poll() -> None:
    """Ray 2.60's streaming executor starts every execution (every epoch) seeing a cluster with no
    CPUs: its first look comes back empty while Ray's autoscaling coordinator answers
    asynchronously, and it keeps that answer for ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S
    (1 s), running one task at a time meanwhile, however large the cluster. Looking again after
    0.1 s shortens each small epoch by most of that second (docs/data.md has the measurement)."""
    from ray.data._internal.execution.resource_manager import ResourceManager
    if ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S > 0.1:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 0.1


def execution_count(data_context) -> int:
    """How many times Ray Data has executed the dataset this context belongs to (0 for the first
    epoch): the per-epoch input to a file order shuffled anew each epoch. Ray's own
    FileShuffleConfig reads the same private counter; there is no public one."""
    return getattr(data_context, "_execution_idx", 0) if data_context is not None else 0


def worker_exceptions(error) -> list[BaseException]:
    """The exceptions a Ray Train worker group raised, as the workers raised them. Train V2's
    WorkerGroupError maps each rank to a wrapper holding the original in a private attribute; a
    StorageFull must be found among them to be said in one line."""
    return [getattr(e, "_base_exc", e) for e in getattr(error, "worker_failures", {}).values()]


def job_submission_id() -> str | None:
    """The id `ray job submit` gave this driver's job (raysubmit_...), or None when it runs otherwise.
    Ray's job supervisor hands its driver the job's config, the submission id among its metadata,
    in this environment variable; there is no public getter."""
    import json
    import os
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return json.loads(raw)["metadata"]["job_submission_id"] if raw else None
    except (ValueError, KeyError, TypeError):
        return None


AWS_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


@contextlib.contextmanager
def tune_keeps_aws_keys_out_of_runtime_envs():
    """Ray Tune 2.60 copies the driver's AWS keys into its trials' runtime env (the module set
    ENV_VARS_TO_PROPAGATE, read each time a trial's actor class is made), and Ray's dashboard shows
    runtime envs and its runtime env agent logs them. Without them there meanwhile; a sweep hands
    its trials the keys itself (pipelines.tune.run_trial)."""
    from ray.tune.execution import class_cache
    kept = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = kept - AWS_KEYS
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = kept
