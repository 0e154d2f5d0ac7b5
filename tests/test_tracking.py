"""Without a cluster: system metrics (the sampler on rank 0's node, the driver's logger) and a
sweep's local MLflow server."""
import logging
import time

from pipelines.tracking import SystemMetricsLog, SystemSampler, ensure_experiment, mlflow_client

NAMES = {"cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
         "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes", "network_receive_megabytes",
         "network_transmit_megabytes"}


def test_the_sampler_sends_mlflows_system_metrics_at_its_interval_until_it_stops(caplog):
    got = []
    with caplog.at_level(logging.WARNING), SystemSampler(0.2, got.append, gpus=True):  # no GPU here: said
        time.sleep(0.9)
    assert len(got) >= 3 and set(got[0]["metrics"]) >= NAMES
    assert all(0 <= s["metrics"]["cpu_utilization_percentage"] <= 100 for s in got)
    assert [s["time_ms"] for s in got] == sorted(s["time_ms"] for s in got)
    if not any(name.startswith("gpu_") for name in got[0]["metrics"]):
        assert "no GPU system metrics" in caplog.text
    sent = len(got)
    time.sleep(0.5)
    assert len(got) == sent  # stopped with its block

    with SystemSampler(0, got.append, gpus=False) as off:  # mlflow.system_metrics_s=0
        time.sleep(0.3)
    assert off.thread is None and len(got) == sent


def test_the_driver_logs_samples_as_system_metrics_stepped_by_seconds_since_the_run_started(mlflow_uri):
    uri = mlflow_uri
    client = mlflow_client(uri)
    run = client.create_run(ensure_experiment(uri, "system"))
    start = run.info.start_time
    with SystemMetricsLog(uri) as log:
        for seconds, cpu in ((3.2, 10.0), (13.9, 20.0)):
            log.log({"run_id": run.info.run_id, "time_ms": start + int(seconds * 1000),
                     "metrics": {"cpu_utilization_percentage": cpu}})
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert [(m.step, m.value) for m in history] == [(3, 10.0), (13, 20.0)]


def test_a_sweeps_local_mlflow_server_ends_when_its_driver_is_killed(mlflow_uri):
    # SIGKILL runs no cleanup in the driver: the server must not go on serving (and holding the store).
    import os
    import signal
    import subprocess
    import sys
    import urllib.request
    from tests.conftest import ROOT
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipelines.tracking import local_tracking_server\n"
         f"url, proc = local_tracking_server({mlflow_uri!r}); print(url, proc.pid, flush=True); time.sleep(300)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    url, server = driver.stdout.readline().split()
    try:
        assert url.startswith("http://127.0.0.1:"), url
        urllib.request.urlopen(f"{url}/health", timeout=5)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
            except OSError:
                break  # gone
            assert time.time() < deadline, f"the MLflow server at {url} still answers 30 s after its driver was killed"
            time.sleep(0.5)
    finally:
        driver.kill()
        driver.stdout.close()
        try:
            os.killpg(int(server), signal.SIGKILL)  # the server's own session: it and its uvicorn
        except ProcessLookupError:
            pass
