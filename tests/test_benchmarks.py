"""The benchmarks run small: the GPU benchmark's every path on the CPU (it must work the day a GPU is
lent), and the input benchmark's four pipelines."""
import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_gpu_benchmark_runs_every_path_small_on_a_cpu(tmp_path):
    out = subprocess.run([sys.executable, "gpu_throughput.py", "--device", "cpu", "--smoke", "--workers", "1",
                          "--profile", str(tmp_path / "profile")],
                         cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_RESNET_HOME": str(tmp_path)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    for label, times in (("fp32", 1), ("bf16 autocast", 1), ("bf16 + channels_last", 1),
                         ("decode alone, torchcodec", 1), ("decode alone, torchvision", 1), ("augment alone", 1),
                         ("encoded rows alone, reaching the worker", 1),
                         ("a. decoded by Ray Data on 1 CPU", 2), ("b. decoded on the cpu", 2),  # input alone, end to end
                         ("pipelines.train, epoch 2", 1), ("cifar_resnet20", 1), ("cifar_resnet56", 1)):
        assert sum(line.lstrip().startswith(label) for line in lines) == times, label
    # the product's own epoch table, both epochs, images/s read from its last row (the second)
    table = [line.split() for line in lines if re.match(r"\s+\d+\s+\d\.\d{4}\s", line)]
    assert [row[0] for row in table] == ["1", "2", "1"]  # then one epoch with host syncs checked
    product = next(line for line in lines if line.startswith("pipelines.train, epoch 2"))
    assert float(re.search(r"([\d,]+) img/s", product).group(1).replace(",", "")) == float(table[1][6])
    assert "host syncs: none in its steps and validation" in lines
    # the product's second epoch profiled (--profile): a trace and a table of its ops
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["gpu-throughput-epoch2.trace.json.gz",
                                                                      "gpu-throughput-epoch2.txt"]
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0


def test_the_gpu_benchmark_runs_only_the_rows_asked_for(tmp_path, monkeypatch):
    """--rows finishes what a time limit stopped: here row 5 alone, no ceiling, no shards, no ratio."""
    run = [sys.executable, "gpu_throughput.py", "--device", "cpu", "--smoke", "--workers", "1", "--rows"]
    out = subprocess.run([*run, "5"], cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_RESNET_HOME": str(tmp_path)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines if re.match(r"\d+b?\. ", line)] == ["5."]
    assert sum(line.startswith(("cifar_resnet20 ", "cifar_resnet56 ")) for line in lines) == 2
    assert not any(line.startswith(("ratio", "(shards")) for line in lines)
    bad = subprocess.run([*run, "4,7"], cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'4,7': give rows from 1,2,3,4,4b,5,6" in bad.stderr, bad.stderr
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_throughput import rows_arg
    assert rows_arg("3") == {"1", "3"} and rows_arg("4, 5") == {"1", "4", "5"} and rows_arg("4b,6") == {"4b", "6"}


def test_the_input_benchmark_runs_small_and_ends_with_its_ratio(tmp_path):
    out = subprocess.run([sys.executable, "data_throughput.py", "--images", "400", "--epochs", "1", "--batch", "16",
                          "--workers", "1"],
                         cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_RESNET_HOME": str(tmp_path)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    for label in ("DataLoader + ImageFolder, raw JPEGs", "the same, decoded as ours", "Ray Data, shards of the raw",
                  "Ray Data, shards --max-side 256"):
        assert any(line.lstrip().startswith(label) for line in lines), label
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0
