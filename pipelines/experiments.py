"""The papers' experiments, one command each, reported beside the papers' numbers:
    python -m pipelines.experiments {degradation,depth,shortcuts,identity} --config ray_config.yaml [key=value ...]

Reads top to bottom: the experiment's grid for the config's model family (GRIDS) -> a Tune sweep of
full trainings (pipelines.tune.sweep without early stopping: every net trains the same epochs) ->
report.md and plots in <checkpoint.storage_path>/<experiment>/report/, also logged to the sweep's
MLflow parent run. The report names the data and budget that produced our numbers, so a run on
the bundled digits is never read as CIFAR-10. Overrides after the experiment's name change its
budget or grid, e.g. `schedule.epochs=20` or `tune.space.model.depth=[20, 110]`; a second run with
the same tune.name resumes.

The papers' numbers are resnet_models/paper.py's tables (docs/papers.md gives their sources).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.checkpoint import read_text
from pipelines.config import Config, ConfigError, cli_errors, parse_cli
from pipelines.data import shards_dir
from pipelines.plots import against_paper, plain_vs_residual
from pipelines.shards import load_manifest
from pipelines.tracking import mlflow_client
from pipelines.tune import label, sweep, sweep_dir, trial_config, varying
from resnet_models.paper import CIFAR_TABLE6, IDENTITY_110, IMAGENET_TOP1
from resnet_models.spec import SHORTCUT_VARIANTS, UNITS, ModelConfig

# experiment -> model family -> tune.space; every other setting comes from the config
GRIDS: dict[str, dict[str, dict[str, list]]] = {
    "degradation": {  # plain nets get worse with depth, ResNets better: paper Fig. 6 / Table 2
        "cifar": {"model.residual": [False, True], "model.depth": [20, 32, 44, 56]},
        "imagenet": {"model.residual": [False, True], "model.depth": [18, 34], "model.shortcut": ["A"]},
    },
    "depth": {  # paper Table 6 (CIFAR-10) / Table 3 (ImageNet)
        "cifar": {"model.depth": [20, 32, 44, 56, 110]},
        "imagenet": {"model.depth": [18, 34, 50, 101, 152]},
    },
    "shortcuts": {  # options A/B/C: paper Table 3 (ResNet-34); on CIFAR at the config's depth
        "cifar": {"model.shortcut": ["A", "B", "C"]},
        "imagenet": {"model.depth": [34], "model.shortcut": ["A", "B", "C"]},
    },
    "identity": {  # ResNet-110, He et al. 2016 Table 1 (shortcuts) and Table 2 (activation placement);
        # its recipe: lr 0.01 until training error is below 80%, then 0.1
        "cifar": {"model.depth": [110], "schedule.warmup_lr": [0.01], "schedule.warmup_until_error": [0.8],
                  "model": [{"shortcut_variant": v} for v in SHORTCUT_VARIANTS]
                  + [{"unit": u} for u in UNITS if u != "original"]},
    },
}

def paper_error(m: ModelConfig) -> tuple[str, str]:
    """(the papers' error in % for this net, where it is from), or ("—", why there is none)."""
    shortcut = m.resolved().shortcut
    if m.family == "imagenet":
        if m.unit != "original" or m.shortcut_variant != "identity":
            return "—", "no ImageNet figure for this unit or shortcut"
        key = (m.residual, m.depth, shortcut if m.residual else "A")
        found = IMAGENET_TOP1.get(key)
        return (f"{found:.2f}", "He et al. 2015 Tables 2-3, ImageNet val top-1, 10-crop") if found else (
            "—", f"no ImageNet figure for {m.name} with option {shortcut}")
    if not m.residual:
        return "—", "Fig. 6 only: plain nets get worse with depth"
    changed = [v for v in (m.unit, m.shortcut_variant) if v not in ("original", "identity")]
    if m.depth == 110 and len(changed) <= 1:
        return IDENTITY_110[changed[0] if changed else "identity"], \
            "He et al. 2016 Tables 1-2, ResNet-110, CIFAR-10 test, median of 5"
    if not changed and shortcut == "A" and m.depth in CIFAR_TABLE6:
        return f"{CIFAR_TABLE6[m.depth]:.2f}", "He et al. 2015 Table 6, CIFAR-10 test"
    return "—", "no CIFAR-10 figure for this net"


def preset(experiment: str):
    """The command line's config -> the overrides that make it this experiment's grid."""
    def overrides(cfg: Config) -> list[str]:
        grids = GRIDS[experiment]
        if cfg.model.family not in grids:
            raise ConfigError(f"model.family={cfg.model.family}: the {experiment} experiment is defined for "
                              f"{' and '.join(grids)} nets; set model.family={next(iter(grids))}")
        return ["tune.space={}", f"tune.name={experiment}", "tune.search=grid", "tune.scheduler=fifo",
                "tune.num_samples=1", *(f"tune.space.{k}={json.dumps(v)}" for k, v in grids[cfg.model.family].items())]
    return overrides


def trials(cfg: Config, grid) -> list[dict]:
    """One dict per trial: its model, label and per-epoch history, plain nets first, by depth."""
    out = []
    for r in grid:
        df = r.metrics_dataframe
        if df is None or "val_error" not in df:
            continue
        params = {k: r.config[k] for k in cfg.tune.space}
        model = trial_config(cfg, params, "x").model
        out.append({"model": model, "label": label(params, varying(cfg)) or model.name,
                    "epochs": df["epoch"].astype(int).tolist(), "train_error": df["train_error"].tolist(),
                    "val_error": df["val_error"].tolist(), "error": type(r.error).__name__ if r.error else ""})
    return sorted(out, key=lambda t: (t["model"].residual, t["model"].depth, t["label"]))


def describe_data(cfg: Config) -> str:
    m = load_manifest(shards_dir(cfg.data))
    src, rows = m["source"], {k: v["rows"] for k, v in m["splits"].items()}
    kind = src.get("kind", "?")
    size = f", {src['image_size']}x{src['image_size']} pixels" if src.get("image_size") else ""
    data = (f"**{kind}** ({rows.get('train', 0):,} training / {rows.get('val', 0):,} validation images, "
            f"{len(m['classes'])} classes{size})")
    if kind == "digits":
        data += (": scikit-learn's 8x8 handwritten digits, upscaled; **not CIFAR-10 or ImageNet**. "
                 "Compare the trends with the papers', not the values")
    s = cfg.schedule
    steps = f"lr / 10 at epochs {s.milestones}" if s.kind == "step" and s.milestone_unit == "epoch" else s.kind
    return (f"- Data: {data}.\n"
            f"- Budget: {s.epochs} epochs, global batch {cfg.data.batch_size}, lr {cfg.optim.lr} at batch "
            f"{cfg.optim.lr_batch} ({steps}), weight decay {cfg.optim.weight_decay}, momentum "
            f"{cfg.optim.momentum}; `{cfg.data.train_transform}` augmentation; "
            f"{cfg.scaling.max_workers} workers x {'GPU' if cfg.scaling.gpus_per_worker else 'CPU'}.\n"
            "- Our errors are single-crop on the validation split; the papers' are CIFAR-10 test error, or "
            "ImageNet validation top-1 with 10 crops.\n")


def table(rows: list[dict]) -> str:
    out = ["| net | settings | epochs | final train error | final val error | best val error | paper | paper's source |",
           "|---|---|---|---|---|---|---|---|"]
    for t in rows:
        paper, where = paper_error(t["model"])
        paper += "%" if paper.replace(".", "").isdigit() else ""  # a figure, in the unit of the columns beside it
        out.append(f"| {t['model'].name} | {t['label']} | {t['epochs'][-1]} | {t['train_error'][-1]:.2%} | "
                   f"{t['val_error'][-1]:.2%} | {min(t['val_error']):.2%} | {paper} | {where} |")
    return "\n".join(out) + "\n"


def degradation_claims(rows: list[dict]) -> str:
    """The claims the degradation experiment exists for, checked at equal epochs: the training
    error over the last three epochs all nets ran (one epoch's error on a small set is noisy)."""
    last = min(t["epochs"][-1] for t in rows)
    window = list(range(max(last - 2, 1), last + 1))
    when = f"epochs {window[0]}-{last}" if len(window) > 1 else f"epoch {last}"
    lines = []
    for residual, expect in ((False, "above"), (True, "at or below")):
        nets = sorted((t for t in rows if t["model"].residual == residual), key=lambda t: t["model"].depth)
        if len(nets) < 2:
            continue
        shallow, deep = nets[0], nets[-1]
        a, b = (sum(t["train_error"][t["epochs"].index(e)] for e in window) / len(window) for t in (deep, shallow))
        shown = a > b if not residual else a <= b
        lines.append(f"- {deep['model'].name} training error {a:.2%} against {shallow['model'].name} {b:.2%} "
                     f"(mean of {when}): the paper has the deeper net {expect}: "
                     f"**{'shown' if shown else 'not shown'}** here.")
    return "\n".join(lines) + "\n"


def report(experiment: str, cfg: Config, grid, command: str) -> Path:
    """report.md and its plots in <sweep>/report/, and into the sweep's MLflow parent run."""
    rows = trials(cfg, grid)
    if not rows:
        raise RuntimeError(f"{experiment}: no trial finished an epoch; see the trials' logs under {sweep_dir(cfg)}")
    out = Path(sweep_dir(cfg)) / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{experiment}: {rows[0]['model'].family} nets"
    plain_vs_residual([{**t, "residual": t["model"].residual} for t in rows], title, str(out / f"{experiment}.png"))
    papers = [paper_error(t["model"])[0] for t in rows]
    against_paper([t["label"] for t in rows], [100 * t["val_error"][-1] for t in rows],
                  [float(p) if p.replace(".", "").isdigit() else None for p in papers],
                  f"{experiment}: ours beside the paper's", str(out / "against_paper.png"))
    failed = [t["label"] for t in rows if t["error"]]
    text = (f"# Experiment: {experiment}\n\n`{command}`\n\n{describe_data(cfg)}\n"
            + (degradation_claims(rows) + "\n" if experiment == "degradation" else "")
            + table(rows)
            + (f"\nTrials that failed before their last epoch: {', '.join(failed)}.\n" if failed else "")
            + f"\n![training curves]({experiment}.png)\n\n![ours beside the paper's](against_paper.png)\n")
    (out / "report.md").write_text(text)
    parent = read_text(sweep_dir(cfg), "mlflow_parent_run_id")
    if parent:
        client = mlflow_client(cfg.mlflow.resolved_uri())
        for name in ("report.md", f"{experiment}.png", "against_paper.png"):
            client.log_artifact(parent.strip(), str(out / name), "report")
    return out / "report.md"


def run(experiment: str, cfg: Config, command: str = "") -> Path:
    _, grid = sweep(cfg)
    return report(experiment, cfg, grid, command or f"python -m pipelines.experiments {experiment}")


WHAT = {"degradation": "plain nets against ResNets as depth grows (2015 Fig. 6, Table 2)",
        "depth": "ResNets of increasing depth (2015 Table 6 on CIFAR, Table 3 on ImageNet)",
        "shortcuts": "shortcut options A, B and C (2015 Table 3)",
        "identity": "ResNet-110's shortcut and activation variants (2016 Tables 1 and 2)"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.experiments",
        description="Run one of the papers' experiments as a Tune grid of full trainings and report it beside "
                    "the papers' numbers.",
        epilog="experiments:\n" + "\n".join(f"  {name:<12} {text}" for name, text in WHAT.items())
               + "\n\nAfter the name, the training options: --config PATH, --print-config, key=value "
                 "overrides (python -m pipelines.experiments depth --help lists them).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=list(GRIDS), help="which experiment")
    if not argv or argv[0] not in GRIDS:  # --help, or no or a wrong name: argparse says which are accepted
        parser.parse_args(argv[:1] or [])
    experiment = argv.pop(0)
    cfg = parse_cli(argv, f"Run the {experiment} experiment ({WHAT[experiment]}) as a Tune grid and report it "
                          "beside the papers' numbers.", preset=preset(experiment),
                    prog=f"python -m pipelines.experiments {experiment}")
    with cli_errors():
        path = run(experiment, cfg, " ".join(["python -m pipelines.experiments", experiment, *argv]))
    print(f"\n{path.read_text()}\nreport: {path}")


if __name__ == "__main__":
    main()
