"""Where a training step's time goes: torch.profiler over a few steps of a run, and what its trace says.

    RAY_RESNET_PROFILE=DIR python -m pipelines.train ...       StepProfile, in the training loop
    python -m pipelines.profiling DIR/<run>-epoch2.trace.json.gz   the summary again, from the file

The trace is a Chrome trace (ui.perfetto.dev) of every thread's ops and every kernel, copy and wait
on every stream. summarize reads back what decides images/s on a GPU (docs/gpu.md): how long a
step took, how much of the profiled steps' time each GPU and each of its streams was busy, and
which threads made the host wait for the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipelines.console import WorkerConsole
    from pipelines.train import Epoch, Job

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
# CUDA runtime calls that return only once the GPU has done something: cudaFree waits for the whole
# device; cudaMemcpy is the blocking copy (cudaMemcpyAsync is not, unless a synchronize follows it).
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaFree")
LOOP = "the training loop"
FEED = "feed: "  # the prefix of the feed threads' annotations (pipelines/feed.py), which name them here


class StepProfile:
    """With RAY_RESNET_PROFILE=DIR in the driver's environment: rank 0 records torch.profiler over
    STEPS steps of the run's second epoch (its first if it has only one; the first compiles), after
    up to SKIP steps that let the input and cuDNN's tuning settle and one of warm-up; not in an
    epoch (or what a resumed start has left of it) shorter than STEPS + 2. On rank 0's node,
    DIR/<run name>-epoch<N>.trace.json.gz, the trace, and DIR/<run name>-epoch<N>.txt, its summary
    (also said on the console) and the ops by their own time. Nothing without it. A profiler that
    fails is said on the console, and the epoch trains on: a diagnostic never stops a run."""

    SKIP, STEPS = 10, 5

    def __init__(self, job: Job, ep: Epoch, say: WorkerConsole):
        self.prof, self.epoch, self.say = None, ep.epoch, say
        self.where, self.name = job.info.get("profile"), job.cfg.run.name
        self.cuda = job.device.type == "cuda"
        if not self.where or job.rank != 0 or ep.epoch != min(2, job.cfg.schedule.epochs):
            return
        steps = ep.steps - ep.start
        if steps < self.STEPS + 2:
            say.line(f"RAY_RESNET_PROFILE={self.where}: epoch {self.epoch} has {steps} steps to train here, "
                     f"fewer than {self.STEPS + 2}: not profiled")
            return
        skip = min(self.SKIP, steps - self.STEPS - 1)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:  # the feed's threads too, and on GPUs the waits on streams and events (torch >= 2.11 has both)
            options = torch._C._profiler._ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=True)
        except (AttributeError, TypeError):
            options = None
        try:
            self.prof = torch.profiler.profile(
                activities=activities, on_trace_ready=self.save, experimental_config=options,
                schedule=torch.profiler.schedule(wait=skip, warmup=1, active=self.STEPS, repeat=1))
            self.prof.start()
        except Exception as e:
            self.failed(e)

    def step(self) -> None:
        self.guarded(lambda prof: prof.step())

    def close(self) -> None:
        self.guarded(lambda prof: prof.stop())
        self.prof = None

    def guarded(self, action) -> None:
        """action(the profiler), while one records; a failure is said and ends the profile."""
        if self.prof:
            try:
                action(self.prof)
            except Exception as e:
                self.failed(e)

    def failed(self, e: Exception) -> None:
        prof, self.prof = self.prof, None
        if prof is not None:
            with contextlib.suppress(Exception):  # not left recording for the rest of the epoch
                prof.stop()
        self.say.line(f"RAY_RESNET_PROFILE={self.where}: no profile of epoch {self.epoch} ({type(e).__name__}: {e}); "
                      "training goes on")

    def save(self, prof) -> None:
        os.makedirs(self.where, exist_ok=True)
        stem = f"{self.where}/{self.name}-epoch{self.epoch}"
        prof.export_chrome_trace(f"{stem}.trace.json.gz")
        try:
            lines = summarize(read_trace(f"{stem}.trace.json.gz"))
        except Exception as e:  # the trace is written: a summary that cannot read it says so
            lines = [f"no summary ({type(e).__name__}: {e})"]
        by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        with open(f"{stem}.txt", "w") as f:
            f.write("\n".join(lines) + "\n\n" + prof.key_averages().table(sort_by=by, row_limit=40) + "\n")
        self.say.line(f"RAY_RESNET_PROFILE: epoch {self.epoch} in {stem}.trace.json.gz (ui.perfetto.dev) and .txt")
        for line in lines:
            self.say.line("  " + line)


def read_trace(path: str | Path) -> list[dict]:
    """The events of a Chrome trace as torch.profiler writes it (gzipped or not)."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(events: list[dict]) -> list[str]:
    """A few lines on the profiled steps (ProfilerStep#N, the training loop's thread): their length;
    for each GPU, the share of that time it ran a kernel or copy on any stream, and each busy
    stream's share, named by the thread that launched most of its work, with its longest gap; and
    the host's waits for the GPU in that time (HOST_WAITS), by thread. Counts and times are those
    within the steps' time. The GPU's work lags the host's that queued it, so these are the GPU's
    shares while the host ran those steps."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in spans if e.get("cat") == "user_annotation" and str(e.get("name")).startswith("ProfilerStep#")]
    if not steps:
        return ["no profiled steps (ProfilerStep#N) in this trace"]
    t0, t1 = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
    if t1 <= t0:
        return [f"{count(len(steps), 'profiled step')} of no length in this trace"]
    thread = thread_names(spans, (steps[0]["pid"], steps[0]["tid"]))

    def within(e: dict) -> bool:  # ran, at least in part, while the host ran the steps
        return e["ts"] < t1 and e["ts"] + e["dur"] > t0

    lines = [f"{count(len(steps), 'step')} in {duration(t1 - t0)}, {duration((t1 - t0) / len(steps))} a step"]
    work = [e for e in spans if e.get("cat") in GPU_WORK]
    if not work:
        return [lines[0] + "; no GPU in this trace"]
    # a kernel's launch: a runtime call (cudaLaunchKernel), or a driver call (cuLaunchKernel: Triton's
    # kernels, which torch.compile makes) of the same correlation
    launched_by = {args(e)["correlation"]: thread(e) for e in spans
                   if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in args(e)}
    devices: dict = defaultdict(lambda: defaultdict(list))
    for e in work:
        devices[args(e).get("device", e["pid"])][args(e).get("stream", e["tid"])].append(e)
    for device, streams in sorted(devices.items(), key=lambda item: str(item[0])):
        every = [e for stream in streams.values() for e in stream]
        lines.append(f"GPU {device}: busy {busy(every, t0, t1)[0] / (t1 - t0):.1%} of those steps' time")
        shares = {s: busy(evs, t0, t1) for s, evs in streams.items()}
        for s in sorted(shares, key=lambda s: -shares[s][0]):
            (ran, gap), evs = shares[s], [e for e in streams[s] if within(e)]
            if ran == 0:
                continue
            who = Counter(launched_by.get(args(e).get("correlation"), "?") for e in evs).most_common(1)[0][0]
            lines.append(f"  stream {s} (from {who}): busy {ran / (t1 - t0):.1%}, "
                         f"{count(len(evs), 'kernel or copy', 'kernels and copies')}, longest gap {duration(gap)}")
    waits: dict[str, Counter] = defaultdict(Counter)
    waited: Counter = Counter()
    for e in spans:
        if e.get("cat") == "cuda_runtime" and e.get("name") in HOST_WAITS and within(e):
            who = thread(e)
            waits[who][e["name"]] += 1
            waited[who] += min(e["ts"] + e["dur"], t1) - max(e["ts"], t0)  # the part within the steps
    said = [f"{LOOP}: none"] if LOOP not in waits else []
    said += [f"{who}: {sum(calls.values())} in {duration(waited[who])} ("
             + ", ".join(f"{name} {n}" for name, n in calls.most_common()) + ")"
             for who, calls in sorted(waits.items(), key=lambda item: item[0] != LOOP)]
    lines.append("host waits for the GPU: " + "; ".join(said))
    return lines


def args(e: dict) -> dict:
    return e.get("args") or {}


def thread_names(spans: list[dict], loop: tuple):
    """A function of an event: the name of its thread: the training loop's, a feed thread by its
    annotation, else its number."""
    labels: dict[tuple, Counter] = defaultdict(Counter)
    for e in spans:
        if e.get("cat") == "user_annotation" and str(e.get("name")).startswith(FEED):
            labels[(e["pid"], e["tid"])][e["name"]] += 1
    names = {thread: counts.most_common(1)[0][0] for thread, counts in labels.items()}
    names[loop] = LOOP
    return lambda e: names.get((e["pid"], e["tid"]), f"thread {e['tid']}")


def busy(events: list[dict], t0: float, t1: float) -> tuple[float, float]:
    """(the time within [t0, t1] that at least one of the events ran, the longest time none did)."""
    total, gap, end = 0.0, 0.0, t0
    for e in sorted(events, key=lambda e: e["ts"]):
        start, stop = max(e["ts"], end), min(e["ts"] + e["dur"], t1)
        if stop <= start:
            continue
        gap = max(gap, start - end)
        total, end = total + stop - start, stop
    return total, max(gap, t1 - end)


def count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def duration(us: float) -> str:
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.0f} µs"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.profiling",
                                description="Summarise the traces RAY_RESNET_PROFILE wrote (docs/gpu.md): each "
                                            "step's time, each GPU's and stream's busy share, the host's waits "
                                            "for the GPU.")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="a <run>-epoch<N>.trace.json.gz")
    for path in p.parse_args(argv).traces:
        try:
            lines = summarize(read_trace(path))
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"{path}: not a torch.profiler trace that can be read ({type(e).__name__}: {e})")
        print("\n".join([path] + ["  " + line for line in lines]))


if __name__ == "__main__":
    main()
