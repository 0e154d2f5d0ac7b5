"""The input stage: transforms, decode, bad records, device normalisation, and Ray Data streaming
that shows every training image exactly once per epoch, in a new order each epoch."""
import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import shards as S
from pipelines.config import load_config
from pipelines.data import (DecodeAugment, ShorterSideRandomResize, build_datasets, build_transform,
                            decode, epoch_batches, to_device)
from pipelines.shards import ShardError
from tests.conftest import CONFIG, ROOT


def jpeg_bytes(w, h, seed=0, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_cfg(*overrides):
    return load_config(CONFIG, list(overrides)).data


@pytest.mark.parametrize("kind, crop, size", [("cifar", 32, (32, 32)), ("paper", 224, (500, 375)),
                                              ("rrc", 224, (500, 375)), ("rrc", 64, (40, 30))])
def test_training_transforms_give_uint8_crops_of_the_configured_size(kind, crop, size):
    data = data_cfg(f"data.train_transform={kind}", f"data.crop_size={crop}")
    out = build_transform(data, train=True)(decode(jpeg_bytes(*size)))
    assert out.dtype == torch.uint8 and out.shape == (3, crop, crop)


def test_the_papers_scale_augmentation_draws_the_shorter_side_from_its_range():
    img = Image.new("RGB", (500, 375))
    sides = {min(ShorterSideRandomResize(256, 480)(img).size) for _ in range(200)}
    assert min(sides) >= 256 and max(sides) <= 480 and len(sides) > 50


def test_validation_is_resize_then_centre_crop_or_the_native_size():
    img = decode(jpeg_bytes(500, 375))
    data = data_cfg("data.crop_size=224", "data.val_resize=256")
    out = build_transform(data, train=False)(img)
    from torchvision.transforms.v2 import functional as TF
    expected = TF.pil_to_tensor(TF.center_crop(TF.resize(img, 256, antialias=True), 224))
    assert torch.equal(out, expected)
    native = build_transform(data_cfg(), train=False)(decode(jpeg_bytes(32, 32)))
    assert torch.equal(native, TF.pil_to_tensor(decode(jpeg_bytes(32, 32))))


def test_large_jpegs_decode_in_the_dct_domain_only_when_nothing_is_lost():
    big = jpeg_bytes(2000, 1500)
    assert decode(big).size == (2000, 1500)
    assert decode(big, min_side=256).size == (500, 375)      # 1/4 scale, shorter side still >= 256
    assert decode(big, min_side=480).size == (1000, 750)     # 1/2 scale
    assert decode(jpeg_bytes(500, 375), min_side=256).size == (500, 375)


def test_bad_records_are_skipped_and_logged_or_fail_naming_the_key(caplog):
    batch = {"image": np.array([jpeg_bytes(32, 32), b"not an image", jpeg_bytes(32, 32, seed=1)], dtype=object),
             "label": np.array([3, 4, 5]), "key": np.array(["a", "bad/key.jpg", "c"], dtype=object)}
    with caplog.at_level(logging.WARNING):
        out = DecodeAugment(data_cfg(), train=True)(batch)
    assert list(out["key"]) == ["a", "c"] and list(out["label"]) == [3, 5]
    assert out["image"].shape == (2, 32, 32, 3) and out["image"].dtype == np.uint8
    assert "skipping bad/key.jpg" in caplog.text
    with pytest.raises(ShardError, match="bad/key.jpg: cannot decode"):
        DecodeAugment(data_cfg("data.bad_records=fail"), train=True)(batch)


def test_normalisation_happens_on_the_device_in_channels_last():
    data = data_cfg()
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    x, y = to_device({"image": images, "label": torch.arange(4)}, torch.device("cpu"), data, channels_last=True)
    mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    assert x.is_contiguous(memory_format=torch.channels_last)
    x, _ = to_device({"image": images, "label": torch.arange(4)}, torch.device("cpu"), data, channels_last=False)
    assert x.is_contiguous()
    g = torch.Generator().manual_seed(0)
    lit, _ = to_device({"image": images, "label": torch.arange(4)}, torch.device("cpu"),
                       data_cfg("data.pca_lighting=0.1"), channels_last=False, generator=g)
    shift = (lit - x).mean(dim=(2, 3))
    assert shift.abs().max() > 0 and torch.allclose(lit - x, shift[:, :, None, None].expand_as(x), atol=1e-5)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    S.write_shards(S.load_digits_source(32, 0), out, S.Options(rows_per_shard=200), progress=None)
    return str(out)


def test_each_epoch_shows_every_training_image_once_across_the_workers(digits_dir, tmp_path, ray_session):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    data = data_cfg(f"data.shards={digits_dir}", "data.shuffle_buffer=256")
    train_ds, _, manifest = build_datasets(data, seed=0)

    def loop(config):
        import ray.train
        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(2):  # batch 1: drop_last drops nothing, every row is counted
            keys = [k for b in epoch_batches(shard, config["data"], epoch, 0, 1, train=True) for k in b["key"]]
            with open(os.path.join(config["out"], f"{epoch}-{rank}.json"), "w") as f:
                json.dump(keys, f)

    TorchTrainer(loop, train_loop_config={"data": data, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 datasets={"train": train_ds}).fit()
    rows = manifest["splits"]["train"]["rows"]
    orders = []
    for epoch in range(2):
        per_rank = [json.loads((tmp_path / f"{epoch}-{r}.json").read_text()) for r in range(2)]
        keys = per_rank[0] + per_rank[1]
        assert len(keys) == len(set(keys))                    # nobody sees an image twice
        assert rows - 1 <= len(keys) <= rows                   # equal shares drop at most world_size - 1
        assert abs(len(per_rank[0]) - len(per_rank[1])) == 0  # DDP steps must match
        orders.append(per_rank[0])
    assert orders[0] != orders[1]                              # a new order each epoch


def test_the_order_is_reproducible_from_the_seed_and_new_each_epoch(digits_dir, ray_session):
    data = data_cfg(f"data.shards={digits_dir}", "data.deterministic=true")

    def order(seed, epoch):
        train_ds, _, _ = build_datasets(data, seed)
        return [k for b in epoch_batches(train_ds, data, epoch, seed, 128, train=True) for k in b["key"]]

    first = order(3, 1)
    assert order(3, 1) == first       # the same seed and epoch: the same order
    assert order(3, 2) != first       # the next epoch: another order
    assert order(4, 1) != first       # another seed: another order
    assert len(first) == 1437 // 128 * 128                     # only the final partial batch is dropped


def test_streaming_five_times_the_object_store_neither_spills_nor_grows(tmp_path, digits_dir):
    # A fresh Ray with a 100 MB object store; 3 epochs of 224x224 crops of 1,437 images are
    # 3 x 216 MB of decoded uint8, 6 times the store. What is in flight at once (shuffle buffer,
    # decode task outputs, prefetch) is sized to the store, as a user's should be.
    script = textwrap.dedent(f"""
        import resource, ray
        from ray._private.internal_api import memory_summary
        from pipelines.config import load_config
        from pipelines.data import build_datasets, epoch_batches
        ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
        data = load_config({str(CONFIG)!r}, ["data.shards={digits_dir}", "data.train_transform=rrc",
                                             "data.crop_size=224", "data.shuffle_buffer=64",
                                             "data.decode_batch=32", "data.prefetch_batches=1"]).data
        train_ds, _, _ = build_datasets(data, 0)
        rss, total = [], 0
        for epoch in range(3):
            for b in epoch_batches(train_ds, data, epoch, 0, 64, train=True):
                total += b["image"].numel()
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print("STREAMED", total)
        print("RSS", *rss)
        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        print("SUMMARY", summary.replace("\\n", " | "))
    """)
    env = {**os.environ, "RAY_RESNET_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in p.stdout.splitlines() if " " in line}
    assert int(lines["STREAMED"]) >= 5 * 100 * 2**20
    rss = [int(v) for v in lines["RSS"].split()]
    assert rss[2] - rss[0] < 200 * 2**20, rss               # the consumer does not keep what it read
    summary = lines["SUMMARY"]
    assert "Spilled" not in summary or "Spilled 0 MiB" in summary, summary
