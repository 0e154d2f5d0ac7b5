"""Ray at the edges: the Ray internals we depend on are where we expect them (a Ray upgrade that
moves one fails here, not mid-training), nothing is patched by an import, every process of a job
gets the setting it needs, and the decode CPU is counted once for jobs and trials alike."""
import subprocess
import sys

from pipelines.config import load_config
from tests.conftest import CONFIG, ROOT


def test_the_ray_internals_we_depend_on_are_still_there():
    from ray.data._internal.execution.resource_manager import ResourceManager
    from ray.data.context import DataContext
    assert isinstance(ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S, (int, float))
    assert isinstance(DataContext.get_current()._execution_idx, int)
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from pipelines.ray_internals import worker_exceptions
    raised = ValueError("in the worker")
    assert worker_exceptions(WorkerGroupError("", {0: UserExceptionWithTraceback(raised, "Traceback ...")})) == [raised]
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.dashboard.modules.job.common import JOB_ID_METADATA_KEY
    assert (RAY_JOB_CONFIG_JSON_ENV_VAR, JOB_ID_METADATA_KEY) == ("RAY_JOB_CONFIG_JSON_ENV_VAR", "job_submission_id")
    from ray.tune.execution import class_cache
    from pipelines.ray_internals import AWS_KEYS, tune_keeps_aws_keys_out_of_runtime_envs
    tune_copies = class_cache.ENV_VARS_TO_PROPAGATE
    assert AWS_KEYS <= tune_copies  # what Tune would put into its trials' runtime env
    with tune_keeps_aws_keys_out_of_runtime_envs():
        assert class_cache.ENV_VARS_TO_PROPAGATE == tune_copies - AWS_KEYS
    assert class_cache.ENV_VARS_TO_PROPAGATE is tune_copies


def test_importing_the_project_patches_nothing():
    code = ("import pipelines.data, pipelines.train, pipelines.tune, pipelines.evaluate, pipelines.experiments\n"
            "from ray.data._internal.execution.resource_manager import ResourceManager as R\n"
            "print(R.GLOBAL_LIMITS_UPDATE_INTERVAL_S)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"  # Ray 2.60's own value


def test_every_process_ray_starts_for_the_job_gets_the_shorter_resource_poll(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    def interval():
        from ray.data._internal.execution.resource_manager import ResourceManager
        return ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S

    assert ray.get(interval.remote()) == 0.1


def test_the_execution_count_advances_with_each_pass_over_a_dataset(ray_session):
    from pipelines.ray_internals import execution_count
    ds = ray_session.data.range(10)
    counts = []
    for _ in range(2):
        list(ds.iter_rows())
        counts.append(execution_count(ds.context))
    assert counts[1] == counts[0] + 1


def test_a_job_and_a_trial_keep_one_cpu_for_decoding():
    from pipelines.runtime import DECODE_CPUS, TRIAL_CPU, job_resources, local_cpus, trial_resources
    cfg = load_config(CONFIG, ["scaling.num_workers=4", "scaling.cpus_per_worker=2", "data.batch_size=128"])
    assert DECODE_CPUS == 1
    assert job_resources(cfg) == (9, 0)
    assert trial_resources(cfg) == (9 + TRIAL_CPU, 0)
    assert local_cpus(cfg) >= 10  # a laptop's Ray is given room for the workers, the decoding and the driver
