"""Profiling a run's steps (RAY_RESNET_PROFILE) and what its trace says: without Ray. The profile of
a whole training run is read in test_train's resume test."""
import gzip
import json
import subprocess
import sys
from types import SimpleNamespace as NS

import pytest
import torch

from pipelines.profiling import StepProfile, read_trace, summarize
from tests.conftest import ROOT


def test_a_profile_is_five_steps_of_the_second_epoch_and_a_failing_one_never_stops_training(tmp_path):
    said = []
    say = NS(line=said.append)

    def run(where, epoch, epochs=3, rank=0, steps=30, start=0, fail_at=None):
        job = NS(info={"profile": str(where)}, cfg=NS(run=NS(name="r"), schedule=NS(epochs=epochs)), rank=rank,
                 device=torch.device("cpu"))
        profile = StepProfile(job, NS(epoch=epoch, steps=steps, start=start), say)
        x = torch.ones(8, 8)
        try:
            for s in range(start + 1, steps + 1):
                if s == fail_at:
                    raise RuntimeError("a step failed")
                x = x @ x / 8
                profile.step()
        finally:
            profile.close()
        assert not torch.autograd.profiler._is_profiler_enabled  # never left recording

    def steps_in(name):
        with gzip.open(tmp_path / "p" / name) as f:
            return sorted(e["name"] for e in json.load(f)["traceEvents"]
                          if str(e.get("name")).startswith("ProfilerStep#"))

    run(tmp_path / "p", epoch=1)                   # not the second epoch
    run(tmp_path / "p", epoch=2, rank=1)           # not rank 0
    assert not (tmp_path / "p").exists() and not said
    run(tmp_path / "p", epoch=2)                   # after 10 steps and one of warm-up, 5
    assert steps_in("r-epoch2.trace.json.gz") == [f"ProfilerStep#{i}" for i in range(11, 16)]
    text = (tmp_path / "p" / "r-epoch2.txt").read_text()
    assert text.startswith("5 steps in ") and "a step; no GPU in this trace\n\n" in text and "aten::mm" in text
    # said on the console: where the files are, and the summary the .txt begins with
    assert said[0] == f"RAY_RESNET_PROFILE: epoch 2 in {tmp_path}/p/r-epoch2.trace.json.gz (ui.perfetto.dev) and .txt"
    assert said[1:] == ["  " + text.split("\n")[0]]
    said.clear()
    run(tmp_path / "p", epoch=1, epochs=1, steps=17, start=10)  # a one-epoch run's first; the 7 steps left
    assert steps_in("r-epoch1.trace.json.gz") == [f"ProfilerStep#{i}" for i in range(2, 7)] and len(said) == 2
    said.clear()
    run(tmp_path / "q", epoch=2, steps=16, start=10)  # 6 steps left: too few for 5 after a warm-up one
    assert not (tmp_path / "q").exists() and said.pop().endswith("epoch 2 has 6 steps to train here, fewer than 7: "
                                                                 "not profiled")
    with pytest.raises(RuntimeError, match="a step failed"):
        run(tmp_path / "p", epoch=2, fail_at=13)   # the loop's own error goes on; the profiler stops
    assert len(said) == 2 and said[1].startswith("  2 steps in ")  # kept: 12, and 13 up to its error
    said.clear()

    (tmp_path / "file").write_text("")             # a folder that cannot be made: said, and the loop goes on
    run(tmp_path / "file", epoch=2)
    assert len(said) == 1 and said[0].startswith(f"RAY_RESNET_PROFILE={tmp_path / 'file'}: no profile of epoch 2 (")
    assert said[0].endswith("; training goes on")


def span(cat, name, ts, dur, pid=1, tid=10, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def kernel(ts, dur, stream, correlation, device=0):
    """A kernel as kineto writes it: pid the device, tid the stream, launched by the runtime call of
    the same correlation."""
    return span("kernel", "volta_sgemm", ts, dur, pid=device, tid=stream, device=device, stream=stream,
                correlation=correlation)


def test_a_gpu_trace_says_each_streams_busy_share_its_longest_gap_and_who_waited_for_the_gpu():
    # Two steps of 500 µs on the training loop's thread (tid 10); a feed thread (tid 11, annotated by
    # pipelines/feed.py) augments on stream 20 and a decode thread (tid 12) waits for nvJPEG.
    loop_launch = [span("cuda_runtime", "cudaLaunchKernel", 5 + i, 2, correlation=100 + i) for i in range(3)]
    feed_launch = [span("cuda_runtime", "cudaLaunchKernel", 1, 2, tid=11, correlation=200)]
    events = [
        span("user_annotation", "ProfilerStep#11", 1000, 500), span("user_annotation", "ProfilerStep#12", 1500, 500),
        span("user_annotation", "feed: augment", 0, 900, tid=11),
        span("user_annotation", "feed: decode", 0, 900, tid=12),
        *loop_launch, *feed_launch,
        # stream 7: busy from before the steps to 1,300, then 1,500 to 1,900; 100 µs idle at the end
        kernel(800, 500, 7, 100), kernel(1500, 300, 7, 101), kernel(1800, 100, 7, 102),
        # stream 20 fills half of stream 7's gap; a memcpy and a kernel running at once count once
        kernel(1300, 100, 20, 200), span("gpu_memcpy", "Memcpy HtoD", 1350, 20, pid=0, tid=20, device=0, stream=20),
        # host waits: the decode thread's, in the steps; one of the loop's before them, not counted
        span("cuda_runtime", "cudaStreamSynchronize", 1200, 30, tid=12, correlation=300),
        span("cuda_runtime", "cudaStreamSynchronize", 1700, 5, tid=12, correlation=301),
        span("cuda_runtime", "cudaEventQuery", 1710, 1, tid=10, correlation=302),  # does not wait
        span("cuda_runtime", "cudaFree", 1950, 20, tid=13, correlation=304),  # a thread with no annotation
        span("cuda_runtime", "cudaDeviceSynchronize", 100, 50, correlation=303),
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 10, "args": {"name": "thread 10"}},
    ]
    assert summarize(events) == [
        "2 steps in 1.0 ms, 500 µs a step",
        "GPU 0: busy 80.0% of those steps' time",
        "  stream 7 (from the training loop): busy 70.0%, 3 kernels and copies, longest gap 200 µs",
        "  stream 20 (from feed: augment): busy 10.0%, 2 kernels and copies, longest gap 600 µs",
        "host waits for the GPU: the training loop: none; feed: decode: 2 in 35 µs (cudaStreamSynchronize 2); "
        "thread 13: 1 in 20 µs (cudaFree 1)"]

    # the loop's own wait, in a step, comes first, only its part within the steps counted; a second
    # GPU has a line of its own; a kernel launched through the driver (Triton's, from torch.compile),
    # or one with no launch in the trace, or with no args (its pid and tid are its device and stream)
    events += [span("cuda_runtime", "cudaMemcpy", 1600, 40, correlation=400),
               span("cuda_runtime", "cudaStreamSynchronize", 1990, 500, correlation=402),
               span("cuda_driver", "cuLaunchKernel", 990, 2, correlation=401), kernel(1000, 250, 3, 401, device=1),
               kernel(1300, 100, 5, 999, device=1), {**kernel(1900, 10, 5, 998, device=1), "args": None}]
    lines = summarize(events)
    assert lines[-1] == ("host waits for the GPU: the training loop: 2 in 50 µs (cudaMemcpy 1, "
                         "cudaStreamSynchronize 1); feed: decode: 2 in 35 µs (cudaStreamSynchronize 2); "
                         "thread 13: 1 in 20 µs (cudaFree 1)")
    assert lines[4:7] == ["GPU 1: busy 36.0% of those steps' time",
                          "  stream 3 (from the training loop): busy 25.0%, 1 kernel or copy, longest gap 750 µs",
                          "  stream 5 (from ?): busy 11.0%, 2 kernels and copies, longest gap 500 µs"]
    assert summarize([e for e in events if e["name"] != "ProfilerStep#12"])[0] == "1 step in 500 µs, 500 µs a step"
    assert summarize(events[2:]) == ["no profiled steps (ProfilerStep#N) in this trace"]
    assert summarize([span("user_annotation", "ProfilerStep#1", 5, 0)]) == [
        "1 profiled step of no length in this trace"]


def test_the_command_summarises_a_trace_and_names_a_file_it_cannot_read(tmp_path):
    trace = tmp_path / "r-epoch2.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": [span("user_annotation", "ProfilerStep#3", 0, 2500)]}, f)
    assert read_trace(trace) == [span("user_annotation", "ProfilerStep#3", 0, 2500)]
    cli = [sys.executable, "-m", "pipelines.profiling"]
    out = subprocess.run([*cli, str(trace)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out == f"{trace}\n  1 step in 2.5 ms, 2.5 ms a step; no GPU in this trace\n"
    (tmp_path / "cut.json.gz").write_bytes(trace.read_bytes()[:40])
    run = subprocess.run([*cli, str(tmp_path / "cut.json.gz")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith(f"{tmp_path / 'cut.json.gz'}: not a torch.profiler trace "
                                                         "that can be read (")
