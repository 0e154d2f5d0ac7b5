"""The training entry point: a real (small) run, its saved config, its optimizer and schedule."""
import math

import pytest
import torch
import yaml

from pipelines.config import Config, ScheduleSection, load_config
from pipelines.train import lr_factor, make_optimizer, train
from resnet_models import build_model
from tests.conftest import CONFIG


def test_a_short_run_learns_and_saves_its_config_beside_its_outputs(tmp_path, ray_session):
    cfg = load_config(CONFIG, [f"checkpoint.storage_path={tmp_path}", "run.name=smoke",
                               "schedule.epochs=3", "schedule.milestones=[2]", "model.depth=8"])
    out = train(cfg)
    saved = tmp_path / "smoke" / "config.yaml"
    assert Config.model_validate(yaml.safe_load(saved.read_text())) == cfg
    h = out["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["train_error"] < 0.7  # 10 classes: chance is 0.9
    assert all(r["train_missing"] == 1437 % 128 and r["val_missing"] == 0 for r in h)  # nothing lost
    assert out["stats"]["params"] == sum(p.numel() for p in out["model"].parameters())


def test_step_schedule_by_epoch_and_by_iteration():
    s = ScheduleSection(epochs=10, milestones=[5, 8])
    assert [lr_factor(e * 10, 10, s) for e in (0, 4, 5, 7, 8, 9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    paper = ScheduleSection(epochs=200, milestones=[32000, 48000], milestone_unit="iteration")
    assert [lr_factor(i, 391, paper) for i in (31999, 32000, 48000)] == pytest.approx([1, 0.1, 0.01])


def test_cosine_schedule_and_linear_warmup():
    s = ScheduleSection(epochs=10, kind="cosine", milestones=[], warmup_epochs=2)
    assert lr_factor(0, 100, s) == pytest.approx(1 / 200 * math.cos(0))
    assert lr_factor(199, 100, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.199)))
    assert lr_factor(500, 100, s) == pytest.approx(0.5)
    assert lr_factor(1000, 100, s) == pytest.approx(0.0)


def test_lr_scales_with_global_batch_and_bn_bias_can_skip_decay():
    cfg = Config().optim.model_copy(update={"lr": 0.1, "lr_batch": 256, "no_decay_bn_bias": True})
    model = build_model("cifar_resnet20", num_classes=10)
    opt = make_optimizer(model, cfg, global_batch=1024)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.4)] * 2
    decay, no_decay = opt.param_groups
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"]) and no_decay["weight_decay"] == 0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())
