"""The benchmarks run small: the GPU benchmark's every path on the CPU (it must work the day a GPU is
lent), and the input benchmark's four pipelines."""
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_gpu_benchmark_runs_every_path_small_on_a_cpu(tmp_path):
    out = subprocess.run([sys.executable, "gpu_throughput.py", "--device", "cpu", "--smoke", "--workers", "1"],
                         cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_RESNET_HOME": str(tmp_path)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()
    for label in ("fp32", "bf16 autocast", "bf16 + channels_last", "a. decode on 1 CPU workers",
                  "(smoke: the GPU-decode path run on cpu", "cifar_resnet20", "cifar_resnet56"):
        assert any(line.lstrip().startswith(label) for line in lines), label
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0


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
