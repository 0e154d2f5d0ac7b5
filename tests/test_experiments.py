"""The papers' experiments: their grids, the papers' numbers beside ours, and each one run small."""
import pytest

from pipelines.config import parse_cli
from pipelines.experiments import paper_error, preset, report, run
from pipelines.tune import trial_config
from resnet_models import ModelConfig
from tests.conftest import CONFIG

TINY = ["schedule.epochs=1", "schedule.milestones=[]", "data.batch_size=32", "data.shuffle_buffer=256",
        "scaling.num_workers=1"]


def experiment_config(name: str, *overrides: str):
    """The config `python -m pipelines.experiments NAME --config ray_config.yaml OVERRIDES` runs."""
    return parse_cli(["--config", str(CONFIG), *overrides], name, preset=preset(name))


def grid_models(cfg) -> list[ModelConfig]:
    import itertools
    space = cfg.tune.space
    return [trial_config(cfg, dict(zip(space, combo)), "t").model for combo in itertools.product(*space.values())]


def test_each_experiment_trains_the_papers_nets():
    names = lambda cfg: sorted(m.name for m in grid_models(cfg))  # noqa: E731
    assert names(experiment_config("degradation")) == sorted(
        [f"cifar_plain{d}" for d in (20, 32, 44, 56)] + [f"cifar_resnet{d}" for d in (20, 32, 44, 56)])
    imagenet = experiment_config("degradation", "model.family=imagenet", "model.depth=18")
    assert {(m.name, m.resolved().shortcut) for m in grid_models(imagenet)} == {
        ("plain18", "A"), ("plain34", "A"), ("resnet18", "A"), ("resnet34", "A")}  # Table 2: option A
    assert names(experiment_config("depth")) == sorted(f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110))
    shortcuts = experiment_config("shortcuts", "model.family=imagenet", "model.depth=50")
    assert {(m.depth, m.resolved().shortcut) for m in grid_models(shortcuts)} == {(34, "A"), (34, "B"), (34, "C")}
    identity = experiment_config("identity")
    models = grid_models(identity)
    assert len(models) == 10 and {m.depth for m in models} == {110}
    assert {m.shortcut_variant for m in models} == {"identity", "constant_scaling", "exclusive_gating",
                                                    "shortcut_only_gating", "conv1x1", "dropout"}
    assert {m.unit for m in models} == {"original", "bn_after_add", "relu_before_add", "relu_only_preact",
                                        "full_preact"}
    assert identity.tune.space["schedule.warmup_lr"] == [0.01]  # the ResNet-110 recipe
    assert all(cfg.tune.scheduler == "fifo" for cfg in (identity, shortcuts))  # equal epochs for all


def test_an_experiment_the_family_lacks_says_which_family_has_it(capsys):
    with pytest.raises(SystemExit) as exit:
        experiment_config("identity", "model.family=imagenet", "model.depth=50")
    assert exit.value.code == 2
    assert "model.family=imagenet: the identity experiment is defined for cifar nets; set model.family=cifar" in \
        capsys.readouterr().err


@pytest.mark.parametrize("model, error, source", [
    (dict(depth=20), "8.75", "Table 6"),
    (dict(depth=110, unit="full_preact"), "6.37", "2016"),
    (dict(depth=110, shortcut_variant="dropout"), "fails", "2016"),
    (dict(depth=56, residual=False), "—", "Fig. 6"),
    (dict(depth=20, shortcut="B"), "—", "no CIFAR-10 figure"),
    (dict(family="imagenet", depth=34, shortcut="C"), "24.19", "Tables 2-3"),
    (dict(family="imagenet", depth=34, residual=False), "28.54", "Tables 2-3"),
    (dict(family="imagenet", depth=50), "22.85", "10-crop"),
])
def test_the_papers_error_for_each_net(model, error, source):
    found, where = paper_error(ModelConfig(**model))
    assert found == error and source in where


def test_degradation_runs_small_and_reports_beside_the_paper_in_mlflow(tmp_path, ray_session, mlflow_uri):
    from mlflow import MlflowClient
    uri = mlflow_uri
    cfg = experiment_config("degradation", *TINY, f"checkpoint.storage_path={tmp_path}", f"mlflow.tracking_uri={uri}",
                            "tune.space.model.depth=[8, 14]")
    path = run("degradation", cfg)
    text = path.read_text()
    assert "**digits**" in text and "not CIFAR-10" in text and "Budget: 1 epochs" in text
    assert "cifar_plain14 training error" in text and "cifar_resnet14 training error" in text  # the claims, checked
    rows = [line for line in text.splitlines() if line.startswith("| cifar_")]
    assert sorted(r.split(" | ")[0] for r in rows) == ["| cifar_plain14", "| cifar_plain8", "| cifar_resnet14",
                                                       "| cifar_resnet8"]
    assert (path.parent / "degradation.png").stat().st_size > 10_000 and (path.parent / "against_paper.png").exists()
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
                                "tags.mlflow.runName = 'degradation'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/report.md", "report/degradation.png", "report/against_paper.png"}


def test_identity_runs_small_with_its_recipe_and_variants(tmp_path, ray_session, mlflow_uri):
    """The one other experiment run end to end: its grid alone sets a warm-up recipe and keys that
    go together ({unit: full_preact}); two of the follow-up paper's variants, at depth 8 not 110."""
    cfg = experiment_config("identity", *TINY, f"checkpoint.storage_path={tmp_path}",
                            f"mlflow.tracking_uri={mlflow_uri}", "tune.space.model.depth=[8]",
                            "tune.space.model=[{unit: full_preact}, {shortcut_variant: conv1x1}]")
    text = run("identity", cfg).read_text()
    assert "# Experiment: identity" in text
    rows = sorted(line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| cifar_"))
    assert rows == [["| cifar_preact_resnet8", "unit=full_preact"], ["| cifar_resnet8", "shortcut_variant=conv1x1"]]


class FakeResult:  # what report() reads of a Tune result
    def __init__(self, config: dict, train_error: list[float], val_error: list[float]):
        import pandas as pd
        self.config, self.error = config, None
        self.metrics_dataframe = pd.DataFrame({"epoch": range(1, len(val_error) + 1), "train_error": train_error,
                                               "val_error": val_error})


@pytest.mark.parametrize("name, overrides, expected", [
    # depth and shortcuts train as degradation and identity do (tested above): their reports, from results
    ("depth", [], [("cifar_resnet20", "depth=20", "8.75%"), ("cifar_resnet32", "depth=32", "7.51%"),
                   ("cifar_resnet44", "depth=44", "7.17%"), ("cifar_resnet56", "depth=56", "6.97%"),
                   ("cifar_resnet110", "depth=110", "6.61%")]),
    ("shortcuts", ["model.family=imagenet", "model.depth=50"],
     [("resnet34", "shortcut=A", "25.03%"), ("resnet34", "shortcut=B", "24.52%"), ("resnet34", "shortcut=C", "24.19%")]),
])
def test_the_depth_and_shortcuts_reports_put_each_net_beside_the_paper(tmp_path, name, overrides, expected):
    import itertools
    cfg = experiment_config(name, f"checkpoint.storage_path={tmp_path}", *overrides)
    space = cfg.tune.space
    grid = [FakeResult(dict(zip(space, combo)), [0.5, 0.2], [0.6, 0.3]) for combo in itertools.product(*space.values())]
    text = report(name, cfg, grid, f"python -m pipelines.experiments {name}").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert [(r[0][2:], r[1], r[6]) for r in rows] == expected
    assert all(r[3:6] == ["20.00%", "30.00%", "30.00%"] for r in rows)  # final train, final val, best val
    assert (tmp_path / name / "report" / "against_paper.png").stat().st_size > 10_000


def test_the_degradation_claims_compare_the_last_three_epochs_training_error():
    from pipelines.experiments import degradation_claims
    def net(depth, residual, last):  # a noisy final epoch must not decide it
        return {"model": ModelConfig(depth=depth, residual=residual), "epochs": [1, 2, 3, 4, 5],
                "train_error": [0.9, 0.5, *last]}
    text = degradation_claims([net(20, False, [0.10, 0.10, 0.10]), net(56, False, [0.30, 0.30, 0.05]),
                               net(20, True, [0.02, 0.02, 0.01]), net(56, True, [0.01, 0.01, 0.03])])
    assert "cifar_plain56 training error 21.67% against cifar_plain20 10.00% (mean of epochs 3-5)" in text
    assert text.count("**shown**") == 2
    text = degradation_claims([net(20, True, [0.01, 0.01, 0.01]), net(56, True, [0.02, 0.02, 0.0])])
    assert "**not shown**" in text and "plain" not in text
