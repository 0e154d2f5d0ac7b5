"""What a person sees: the epoch table, progress within an epoch (a bar on a terminal, a line every
run.progress_s otherwise), and every entry point's --help."""
import io
import subprocess
import sys

import pytest

from pipelines.console import ConsoleView, WorkerConsole, header, progress_line, summary, table_row
from tests.conftest import ROOT

ROW = {"epoch": 7, "lr": 0.01, "train_loss": 0.0653, "train_error": 0.0192, "val_error": 0.0083,
       "val_top5_error": 0.0, "images_per_s": 363.4, "data_wait": 0.1, "workers": 2, "epoch_time_s": 4.3,
       "train_skipped": 0, "val_skipped": 0}


def test_the_table_row_lines_up_under_its_header_and_counts_undecodable_images():
    assert len(table_row(ROW)) == len(header())
    assert table_row(ROW).split() == ["7", "0.0100", "0.0653", "1.92%", "0.83%", "0.00%", "363", "10%", "2",
                                     "4.3s"]
    assert table_row({**ROW, "train_skipped": 3}).endswith("(3 training images undecodable: data.bad_records=skip)")


def test_progress_is_a_line_with_rate_wait_and_eta_when_the_output_is_not_a_terminal():
    out = io.StringIO()
    view = ConsoleView(out, tty=False)
    view.handle("progress", {"epoch": 3, "images": 320_000, "total": 1_281_167, "rate": 3000.0, "wait": 0.25})
    view.handle("line", "    3 ...")
    assert out.getvalue().splitlines() == [
        "  epoch 3: 320,000/1,281,167 images (25%), 3,000 img/s, data wait 25%, ETA 5 min 20 s", "    3 ..."]
    assert progress_line({"epoch": 1, "images": 0, "total": 10, "rate": 0.0, "wait": 0.0}).endswith("ETA ?")


def test_on_a_terminal_progress_is_a_bar_that_gives_way_to_the_epoch_row():
    out = io.StringIO()
    view = ConsoleView(out, tty=True)
    view.handle("progress", {"epoch": 3, "images": 640, "total": 1280, "rate": 320.0, "wait": 0.5})
    assert "epoch 3: 640/1,280 images (50%)" in out.getvalue() and "640/1,280 images (50%), 320 img/s, data wait 50%, ETA 2 s" in out.getvalue()
    view.handle("line", "the row")
    assert view.bar is None and out.getvalue().endswith("the row\n")


class FakeQueue:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


def test_rank_0_sends_progress_no_more_often_than_the_interval(monkeypatch):
    import pipelines.console as console
    clock = iter([0.0, 0.5, 1.0, 30.0, 31.0, 60.5])
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    queue = FakeQueue()
    say = WorkerConsole({"queue": queue, "interval": 30.0})
    say.start_epoch(1, 1000)          # t = 0
    for images in (100, 200, 500, 600, 900):  # t = 0.5, 1, 30, 31, 60.5
        say.step(images, waited=3.0)
    sent = [p for kind, p in queue.items if kind == "progress"]
    assert [p["images"] for p in sent] == [500, 900]
    assert sent[0]["rate"] == pytest.approx(500 / 30) and sent[0]["wait"] == pytest.approx(0.1)
    quiet = FakeQueue()
    WorkerConsole({"queue": quiet, "interval": 30.0}, enabled=False).line("not rank 0")
    assert quiet.items == []


def test_the_closing_summary_counts_the_epochs_this_command_trained():
    def first(epochs, before):
        return summary(epochs, 42.0, 0.0139, (0.0139, 7, "checkpoint_x"), "runs/r", "r", "abc", "ray-resnet",
                       "mlflow ui", before=before).split("\n")[0]

    assert first(10, 0) == "done: 10 epochs in 42 s; final val error 1.39%, best 1.39% (epoch 7)"
    assert first(12, 10) == "done: epochs 11..12 in 42 s (12 in all); final val error 1.39%, best 1.39% (epoch 7)"
    assert first(11, 10).startswith("done: epoch 11 in 42 s (11 in all); ")
    # run again once finished (or with fewer epochs): nothing trained, and no time claimed for it
    assert first(10, 10).startswith("done: no epoch left to train (10 trained before); final val error 1.39%")
    assert first(10, 12).startswith("done: no epoch left to train (12 trained before); ")


ENTRY_POINTS = ["pipelines.shards", "pipelines.train", "pipelines.tune", "pipelines.evaluate", "pipelines.experiments",
                "pipelines.profiling", "benchmarks/data_throughput.py", "benchmarks/gpu_throughput.py", "benchmarks/shard_writer.py",
                "cluster/grafana/build_dashboard.py"]
# One process runs every --help (each a fresh import of torch and Ray would cost seconds).
HELP = """
import contextlib, io, json, runpy, sys
results = {}
for entry in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [entry, "--help"]
    if entry.endswith(".py"):
        sys.path.insert(0, entry.rsplit("/", 1)[0])
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(entry, run_name="__main__") if entry.endswith(".py") else \
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
        code = None
    except SystemExit as e:
        code = e.code
    results[entry] = [code, out.getvalue()]
print(json.dumps(results))
"""


def test_every_entry_point_answers_help():
    import json
    out = subprocess.run([sys.executable, "-c", HELP, *ENTRY_POINTS], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    for entry in ENTRY_POINTS:
        code, text = results[entry]
        # a module's usage line is the command that runs it (python pipelines/train.py does not import)
        usage = "usage: " + (f"python -m {entry}" if not entry.endswith(".py") else "")
        assert code == 0 and text.startswith(usage), (entry, code, text[-500:])
    for script in ("dev.sh", "cluster/local.sh", "benchmarks/gpu_check.sh", "benchmarks/gpu_install.sh",
                   "benchmarks/gpu_wheels.sh"):
        out = subprocess.run(["bash", script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"{script} " in out.stdout, (script, out)  # its usage lines

