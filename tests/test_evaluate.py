"""Evaluation: 10-crop and multi-scale scores against views built by hand, top-5 counting, choosing a
run's best checkpoint, clear errors for bad paths, and the whole evaluation on Ray Data (from a
checkpoint in process, from an MLflow model on the command line)."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipelines.checkpoint import find_checkpoint, load_state
from pipelines.config import ConfigError, load_config
from pipelines.data import shards_dir
from pipelines.evaluate import (Views, choose_views, count_hits, evaluate, main, mean_scores, model_from_checkpoint,
                                parse_args, resolve_config)
from pipelines.train import fit
from resnet_models import build_model
from tests.conftest import CONFIG

TINY = ["model.depth=8", "schedule.milestones=[]", "data.shuffle_buffer=256", "schedule.epochs=1",
        "data.batch_size=32", "scaling.num_workers=1"]


def sharp_model(seed=0):
    """A random ResNet-8 with sharper outputs, so that its views disagree clearly and a hand-built
    view off by a pixel or a flip would change the mean (the tests check that the views differ)."""
    torch.manual_seed(seed)
    model = build_model("cifar_resnet8", num_classes=10).eval()
    with torch.no_grad():
        model.fc.weight.mul_(10)
    return model


def probs(model, x):
    with torch.no_grad():
        return model(x).softmax(1)


def test_ten_crop_is_the_mean_of_the_ten_views_built_by_hand():
    model, c = sharp_model(), 28
    x = torch.randn(2, 3, 36, 40)  # H - c and W - c even: the centre crop starts at (4, 6) exactly
    crops = [x[..., :c, :c], x[..., :c, -c:], x[..., -c:, :c], x[..., -c:, -c:], x[..., 4:4 + c, 6:6 + c]]
    views = crops + [v.flip(-1) for v in crops]
    each = torch.stack([probs(model, v) for v in views])
    assert (each - each.mean(0)).abs().max() > 0.05  # the ten views really disagree

    got = mean_scores(model, list(x), Views("10crop", crop=c, flip=True), max_batch=7)
    torch.testing.assert_close(got, each.mean(0))
    no_flips = mean_scores(model, list(x), Views("10crop", crop=c, flip=False))
    torch.testing.assert_close(no_flips, each[:5].mean(0))


def test_multiscale_is_the_mean_over_whole_resized_images_and_their_flips():
    model, scales = sharp_model(), (24, 32, 48)
    images = [torch.randn(3, 32, 40), torch.randn(3, 40, 32)]  # sizes differ: scored in one call
    expected = []
    for x in images:
        h, w = x.shape[1:]
        views = []
        for s in scales:  # shorter side s, the longer scaled alike (truncated, as torchvision does)
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            y = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)
            views += [y, y.flip(-1)]
        each = torch.cat([probs(model, v) for v in views])
        assert (each - each.mean(0)).abs().max() > 0.05
        expected.append(each.mean(0))
    got = mean_scores(model, images, Views("multiscale", scales=scales, flip=True))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_top1_and_top5_count_the_label_among_the_best_one_and_five():
    scores = torch.tensor([[.50, .20, .10, .08, .06, .04, .02],    # label 0: first
                           [.30, .25, .20, .12, .08, .04, .01],    # label 4: fifth
                           [.30, .25, .20, .12, .08, .04, .01],    # label 5: sixth
                           [.01, .02, .04, .08, .12, .20, .53]])   # label 5: second
    labels = torch.tensor([0, 4, 5, 5])
    assert count_hits(scores.topk(5, dim=1).indices, labels) == (1, 3)


def test_default_views_follow_the_paper_scaled_to_the_training_crop():
    digits = load_config(CONFIG).data  # 32x32, no val_resize, trained without flips
    assert choose_views(digits, "10crop") == Views("10crop", crop=28, resize=None, flip=False)
    assert choose_views(digits, "multiscale").scales == (32, 37, 55, 69, 91)
    assert choose_views(digits, "multiscale", flip=True).count == 10
    imagenet = load_config(CONFIG, ["data.crop_size=224", "data.val_resize=256", "data.flip=true"]).data
    assert choose_views(imagenet, "10crop") == Views("10crop", crop=224, resize=256, flip=True)
    assert choose_views(imagenet, "10crop").count == 10
    assert choose_views(imagenet, "multiscale").scales == (224, 256, 384, 480, 640)
    with pytest.raises(ConfigError, match="--crop 300: larger than the shorter side --resize 256"):
        choose_views(imagenet, "10crop", crop=300)


def fake_checkpoint(directory, val_error, seed):
    cfg = load_config(CONFIG, ["model.depth=8"])
    model = sharp_model(seed)
    directory.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 1, "history": [{"epoch": 1, "val_error": val_error}],
                "model_name": cfg.model.name, "num_classes": 10, "config": cfg.model_dump(mode="json")},
               directory / "state.pt")
    return model


def test_a_run_directory_gives_its_checkpoint_with_the_lowest_validation_error(tmp_path, capsys):
    fake_checkpoint(tmp_path / "run" / "checkpoint_2026-01-01_00-00-01.000000", 0.30, seed=0)
    best = fake_checkpoint(tmp_path / "run" / "checkpoint_2026-01-01_00-00-02.000000", 0.10, seed=1)
    fake_checkpoint(tmp_path / "run" / "checkpoint_2026-01-01_00-00-03.000000", 0.20, seed=2)
    # what a write cut short leaves (storage full, a node lost): skipped, and said which
    (tmp_path / "run" / "checkpoint_2026-01-01_00-00-04.000000").mkdir()
    (tmp_path / "run" / "checkpoint_2026-01-01_00-00-04.000000" / "state.pt").write_bytes(b"")
    (tmp_path / "run" / "checkpoint_2026-01-01_00-00-05.000000").mkdir()
    model, trained, source = model_from_checkpoint(str(tmp_path / "run"))
    assert "checkpoint_2026-01-01_00-00-02.000000" in source
    out = capsys.readouterr().out
    assert "picked checkpoint_2026-01-01_00-00-02.000000" in out and "the lowest of 3 checkpoints" in out
    assert "skipped 2 unreadable checkpoint(s): checkpoint_2026-01-01_00-00-04.000000 (not a checkpoint" in out
    assert "checkpoint_2026-01-01_00-00-05.000000 (not a checkpoint" in out
    torch.testing.assert_close(model.fc.weight, best.fc.weight)
    assert trained["model"]["depth"] == 8
    # A checkpoint directory itself is taken as it is.
    assert find_checkpoint(str(tmp_path / "run" / "checkpoint_2026-01-01_00-00-01.000000"))[0]["history"][-1][
        "val_error"] == 0.30


def test_a_bad_checkpoint_path_is_named_with_what_would_be_accepted(tmp_path):
    accepted = "give a checkpoint_\\* directory of a run or a run directory"
    with pytest.raises(ConfigError, match=f"{tmp_path}/nowhere: no such directory; {accepted}"):
        find_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=f"{tmp_path}: no state.pt and no checkpoint_\\* directories"):
        find_checkpoint(str(tmp_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=f"{tmp_path}/broken/state.pt: not a checkpoint pipelines.train wrote"):
        find_checkpoint(str(tmp_path / "broken"))


def test_the_command_line_says_what_it_would_accept(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}/nowhere: no such directory; give a "
                                               "checkpoint_* directory of a run or a run directory")


def test_overrides_and_config_take_precedence_over_the_trained_config(tmp_path):
    trained = load_config(CONFIG, ["data.crop_size=32", "data.decode_batch=16"]).model_dump(mode="json")
    cfg = resolve_config(None, ["data.decode_batch=8"], trained, "a run")
    assert cfg.data.decode_batch == 8 and cfg.data.crop_size == 32
    assert resolve_config(str(CONFIG), [], trained, "a run").data.decode_batch == 64
    with pytest.raises(ConfigError, match="the config a run trained with, and the overrides: data.dcode_batch"):
        resolve_config(None, ["data.dcode_batch=8"], trained, "a run")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, mlflow_template):
    """One epoch of ResNet-8 on the digits: a run directory, its checkpoint and its MLflow run, its
    best model registered as version 1 of digits-resnet8 with the alias champion."""
    tmp = tmp_path_factory.mktemp("evaluate")
    shutil.copy(mlflow_template, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(CONFIG, [f"checkpoint.storage_path={tmp}", "run.name=eval", f"mlflow.tracking_uri={uri}",
                               "mlflow.register_model=digits-resnet8", "mlflow.model_alias=champion", *TINY])
    state = load_state(fit(cfg).checkpoint)
    return {"run_dir": cfg.run_dir, "state": state, "uri": uri, "shards": shards_dir(cfg.data)}


def test_evaluation_on_ray_data_scores_every_image_once(trained):
    """10-crop from the native 32x32 digits: images of their own sizes through Ray Data (the path
    multiscale takes too), each counted once."""
    ten = evaluate(parse_args(["--checkpoint", trained["run_dir"], "--mode", "10crop", "--flip"]))
    assert ten["images"] == 360 and ten["skipped"] == 0 and ten["views"] == 10 and ten["crop"] == 28
    assert 0 <= ten["top5_error"] <= ten["top1_error"] <= 1


def test_the_best_model_is_registered_with_its_validation_error_and_alias(trained):
    from mlflow import MlflowClient
    from pipelines.evaluate import model_from_mlflow
    client = MlflowClient(trained["uri"])
    version = client.get_model_version_by_alias("digits-resnet8", "champion")
    row = trained["state"]["history"][-1]
    assert int(version.version) == 1 and float(version.tags["val_error"]) == pytest.approx(row["val_error"], rel=1e-5)
    assert version.run_id == trained["state"]["mlflow_run_id"] and version.tags["run_name"] == "eval"
    registered, _, _ = model_from_mlflow("models:/digits-resnet8/latest", trained["uri"])
    logged, _, _ = model_from_mlflow(f"runs:/{version.run_id}/best_model", trained["uri"])
    for (k, a), b in zip(registered.state_dict().items(), logged.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_command_line_scores_an_mlflow_model_as_training_validated_it(trained, run_cli, tmp_path):
    """Single crop is the training's own validation view: the same errors, from the registered model."""
    out = tmp_path / "results.json"
    proc = run_cli("pipelines.evaluate", "--model-uri", "models:/digits-resnet8@champion", "--shards",
                   trained["shards"], "--out", str(out), f"mlflow.tracking_uri={trained['uri']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("single: top-1 error ") and "on 360 images (1 view; 0 skipped)" in line
    assert "Downloading artifacts" not in proc.stdout + proc.stderr  # MLflow's progress bars: off
    result = json.loads(out.read_text())
    row = trained["state"]["history"][-1]
    assert result["images"] == 360 and result["shards"] == trained["shards"]
    assert result["top1_error"] == pytest.approx(row["val_error"], abs=1e-9)
    assert result["top5_error"] == pytest.approx(row["val_top5_error"], abs=1e-9)
