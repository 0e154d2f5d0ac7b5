"""The input stage: transforms, decode, bad records, device normalisation, and Ray Data streaming
that shows every training image exactly once per epoch, in a new order each epoch."""
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import ray.data
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from pipelines import plan
from pipelines import shards as S
from pipelines.config import load_config
from pipelines.data import (DecodeAugment, PlanSource, ShardSource, ShorterSideRandomResize, build_datasets,
                            build_transform, decode, epoch_batches, planned_dataset, to_device)
from pipelines.plan import read_units
from pipelines.shards import ShardError, check_shards
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


@pytest.mark.parametrize("kind", ["cifar", "paper", "rrc", "val"])
def test_our_transforms_draw_and_give_the_pixels_of_torchvisions_compose(kind):
    # build_transform applies torchvision's transforms without T.Compose's per-call machinery, and
    # crops in HWC memory: seed for seed, the same random draws and pixels as the stock Compose.
    crop = 32 if kind == "cifar" else 224
    data = data_cfg(f"data.train_transform={'rrc' if kind == 'val' else kind}", f"data.crop_size={crop}",
                    "data.flip=true", "data.val_resize=256")
    stock = {"cifar": [T.RandomCrop(32, padding=4)],
             "paper": [ShorterSideRandomResize(256, 480), T.RandomCrop(224, pad_if_needed=True)],
             "rrc": [T.RandomResizedCrop(224, antialias=True)],
             "val": [T.Resize(256, antialias=True), T.CenterCrop(224)]}[kind]
    stock = T.Compose(stock + ([] if kind == "val" else [T.RandomHorizontalFlip()]))
    ours = build_transform(data, train=kind != "val")
    img = decode(jpeg_bytes(*((32, 32) if kind == "cifar" else (500, 375))))  # 3 x H x W, HWC in memory
    for seed in range(12):
        for x in (img, img.contiguous()):  # as decoded, and CHW memory
            torch.manual_seed(seed)
            a, after = ours(x), torch.rand(1)
            torch.manual_seed(seed)
            assert torch.equal(a, stock(x)) and torch.equal(after, torch.rand(1))
    torch.manual_seed(0)
    pil = ours(TF.to_pil_image(img))  # PIL in: the plain Compose, tensor out
    assert type(pil) is torch.Tensor and pil.shape == (3, crop, crop)
    if kind == "rrc":  # the crop stays HWC in memory, so batching it is a plain copy
        assert ours(img).permute(1, 2, 0).is_contiguous()


def test_the_papers_scale_augmentation_draws_the_shorter_side_from_its_range():
    img = Image.new("RGB", (500, 375))
    sides = {min(ShorterSideRandomResize(256, 480)(img).size) for _ in range(200)}
    assert min(sides) >= 256 and max(sides) <= 480 and len(sides) > 50


def test_validation_is_resize_then_centre_crop_or_the_native_size():
    img = decode(jpeg_bytes(500, 375))
    data = data_cfg("data.crop_size=224", "data.val_resize=256")
    out = build_transform(data, train=False)(img)
    expected = TF.center_crop(TF.resize(img, 256, antialias=True), 224)
    assert out.shape == (3, 224, 224) and torch.equal(out, expected)
    native = build_transform(data_cfg(), train=False)(decode(jpeg_bytes(32, 32)))
    assert torch.equal(native, decode(jpeg_bytes(32, 32)))


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"),
                                       ("PNG", "P"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB")])
def test_decode_gives_pils_rgb_pixels_for_every_format(fmt, mode):
    # JPEG/PNG/WebP through TorchCodec, the rest through PIL: the same pixels either way.
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    expected = TF.pil_to_tensor(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    out = decode(buf.getvalue())
    assert out.dtype == torch.uint8 and out.shape == (3, 30, 40) and torch.equal(out, expected)


def test_large_jpegs_decode_in_the_dct_domain_only_when_nothing_is_lost():
    big = jpeg_bytes(2000, 1500)
    assert decode(big).shape == (3, 1500, 2000)
    assert decode(big, min_side=256).shape == (3, 375, 500)      # 1/4 scale, shorter side still >= 256
    assert decode(big, min_side=480).shape == (3, 750, 1000)     # 1/2 scale
    assert decode(jpeg_bytes(500, 375), min_side=256).shape == (3, 375, 500)


def test_bad_records_are_skipped_and_logged_or_fail_naming_the_key(caplog):
    batch = {"image": np.array([jpeg_bytes(32, 32), b"not an image", jpeg_bytes(32, 32, seed=1)], dtype=object),
             "label": np.array([3, 4, 5]), "key": np.array(["a", "bad/key.jpg", "c"], dtype=object)}
    with caplog.at_level(logging.WARNING):  # a read block in, decode_batch rows at a time out
        chunks = list(DecodeAugment(data_cfg("data.decode_batch=2"), train=True)(batch))
    # the bad row stays as a placeholder (label -1, blank), so the epoch counts it apart from dropped rows
    assert [list(c["key"]) for c in chunks] == [["a", "bad/key.jpg"], ["c"]]
    out = {k: np.concatenate([c[k] for c in chunks]) for k in ("image", "label")}
    assert list(out["label"]) == [3, -1, 5]
    assert out["image"].shape == (3, 32, 32, 3) and out["image"].dtype == np.uint8
    assert not out["image"][1].any() and out["image"][0].any()
    assert "skipping bad/key.jpg" in caplog.text
    with pytest.raises(ShardError, match="bad/key.jpg: cannot decode"):
        list(DecodeAugment(data_cfg("data.bad_records=fail"), train=True)(batch))


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


def test_runs_started_together_on_a_fresh_home_each_get_the_whole_digits(tmp_path, monkeypatch):
    # Two runs (or a sweep's first trials) write the bundled digits at the same moment, over a
    # folder a killed run left without its manifest: both get every shard, written once.
    import threading
    import pipelines.data as D
    monkeypatch.setattr(D, "HOME", tmp_path)
    (tmp_path / "shards" / "digits" / "train").mkdir(parents=True)
    (tmp_path / "shards" / "digits" / "train" / "train-00000.parquet").write_bytes(b"half a shard")
    fsync = os.fsync  # a slow disk: each file stays half-written a while, where the other writer can meet it
    monkeypatch.setattr(os, "fsync", lambda fd: (time.sleep(0.05), fsync(fd)))
    start, got, failed = threading.Barrier(2), [], []

    def run():
        start.wait()
        try:
            got.append(D.shards_dir(data_cfg()))
        except Exception as e:
            failed.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed and got == [str(tmp_path / "shards" / "digits")] * 2
    rows = {s: sum(sum(groups) for _, _, groups in check_shards(got[0], s, verify="sha256"))
            for s in ("train", "val")}
    assert rows == {"train": 1437, "val": 360}
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [".digits.lock", "digits"]


def test_each_epoch_shows_every_training_image_once_across_the_workers(digits_dir, tmp_path, ray_session):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    # No shuffle buffer and tasks in order: a new order each epoch comes from the read tasks'
    # per-execution order alone, inside Train's split coordinator.
    # Beside it, the encoded rows that data.decode=gpu hands the workers, decoded in each worker.
    data = data_cfg(f"data.shards={digits_dir}", "data.shuffle_buffer=0", "data.deterministic=true")
    train_ds, _, manifest = build_datasets(data, seed=0)
    encoded_ds, _, _ = build_datasets(data, seed=0, encoded=True)

    def loop(config):
        import ray.train
        from pipelines.feed import DeviceBatch, device_batches
        from pipelines.gpu_decode import BatchAugment
        rank = ray.train.get_context().get_world_rank()
        shard, encoded = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("encoded")
        augment = BatchAugment(config["data"], True, torch.device("cpu"), np.random.default_rng(rank))
        for epoch in range(2):  # batch 1: drop_last drops nothing, every row is counted
            keys = [k for b in epoch_batches(shard, config["data"], epoch, 0, 1, train=True) for k in b["key"]]
            decoded = []

            def prepare(b):
                x, y, skipped = augment(b)
                assert x.shape == (len(b["key"]), 3, 32, 32) and skipped == 0
                assert torch.equal(y, b["label"].long())  # each label stays with its row
                decoded.extend(b["key"])
                return DeviceBatch(x, y, len(b["key"]), skipped)

            for _ in device_batches(epoch_batches(encoded, config["data"], epoch, 0, 16, train=True), prepare,
                                    torch.device("cpu")):
                pass
            for name, got in (("decoded", keys), ("encoded", decoded)):
                with open(os.path.join(config["out"], f"{name}-{epoch}-{rank}.json"), "w") as f:
                    json.dump(got, f)

    TorchTrainer(loop, train_loop_config={"data": data, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 datasets={"train": train_ds, "encoded": encoded_ds}).fit()
    rows = manifest["splits"]["train"]["rows"]
    orders = []
    for epoch in range(2):
        encoded = [json.loads((tmp_path / f"encoded-{epoch}-{r}.json").read_text()) for r in range(2)]
        assert len(encoded[0]) == len(encoded[1]) == rows // 2 // 16 * 16          # whole batches only
        assert len(set(encoded[0] + encoded[1])) == len(encoded[0] + encoded[1])  # none twice
        per_rank = [json.loads((tmp_path / f"decoded-{epoch}-{r}.json").read_text()) for r in range(2)]
        keys = per_rank[0] + per_rank[1]
        assert len(keys) == len(set(keys))                    # nobody sees an image twice
        assert rows - 1 <= len(keys) <= rows                   # equal shares drop at most world_size - 1
        assert abs(len(per_rank[0]) - len(per_rank[1])) == 0  # DDP steps must match
        orders.append(per_rank[0])
    assert orders[0] != orders[1]                              # a new order each epoch


def test_read_tasks_cover_every_row_group_once_in_an_order_drawn_per_execution(tmp_path):
    out = tmp_path / "digits"
    S.write_shards(S.load_digits_source(8, 0), out, S.Options(rows_per_shard=1100), progress=None)
    shards = check_shards(str(out), "train")
    assert [groups for _, _, groups in shards] == [[256, 256, 256, 256, 76], [256, 81]]  # 1,437 rows
    fs, _ = pyarrow.fs.FileSystem.from_uri(str(out))
    source = ShardSource(shards, fs, ["key"], seed=3)
    assert [(len(u.groups), u.rows) for u in source.units] == [(4, 1024), (1, 76), (2, 337)]  # up to 1,024 rows a task

    def order(execution, seed=3):
        context = ray.data.DataContext()
        context._execution_idx = execution
        tasks = ShardSource(shards, fs, ["key"], seed).get_read_tasks(1, data_context=context)
        return [(t.metadata.input_files[0], t.metadata.num_rows) for t in tasks], tasks

    first, tasks = order(0)
    keys = [k for t in tasks for block in t() for k in block["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == 1437 and sum(n for _, n in first) == 1437
    assert order(0)[0] == first                                       # the same execution: the same order
    assert len({tuple(order(e)[0]) for e in range(6)}) > 1            # later epochs: new orders
    assert [order(e, seed=None)[0] for e in (0, 1)] == [[(u.path, u.rows) for u in source.units]] * 2  # no seed: as written

    # A worker's planned rows (pipelines.plan): read in their order, each with its number, and
    # only the row groups that hold them
    in_manifest_order = [k for path, _, groups in shards for g in range(len(groups))
                         for k in pq.ParquetFile(path).read_row_group(g, columns=["key"])["key"].to_pylist()]
    units = read_units(shards)
    rows = plan.rank_rows(plan.epoch_order(units, 3, 1), None, 9, 100, 3, 1)  # rank 1 of 3: 33 a step
    runs = plan.read_runs(units, rows)
    tables = [t for task in PlanSource(units, runs, fs, ["key"]).get_read_tasks(1) for t in task()]
    assert [t.num_rows for t in tables] == [len(local) for _, local in runs]
    idx = [i for t in tables for i in t["idx"].to_pylist()]
    assert idx == rows.tolist() and len(idx) == 9 * 33
    assert [k for t in tables for k in t["key"].to_pylist()] == [in_manifest_order[i] for i in idx]


def test_validation_shares_read_through_worker_pipelines_score_every_image_once(digits_dir, ray_session):
    """Each worker's share of the validation split (plan.validation_rows) through planned_dataset,
    as train_loop's validate reads it; a worker with no share gets an empty pipeline, not an error."""
    data = data_cfg(f"data.shards={digits_dir}")
    fs, _ = pyarrow.fs.FileSystem.from_uri(digits_dir)
    units = read_units(check_shards(digits_dir, "val"))
    rows = sum(u.rows for u in units)

    def share(world, rank):
        runs = plan.read_runs(units, plan.validation_rows(rows, world, rank))
        ds = planned_dataset(data, fs, units, runs, train=False)
        return [(k, i) for b in epoch_batches(ds, data, 1, 0, 64, train=False)
                for k, i in zip(b["key"], b["idx"].tolist())]

    shares = [share(3, r) for r in range(3)]
    keys = [k for part in shares for k, _ in part]
    assert len(keys) == len(set(keys)) == rows == 360
    for r, part in enumerate(shares):  # each its contiguous slice (in any order: counts only)
        assert sorted(i for _, i in part) == plan.validation_rows(rows, 3, r).tolist()
    assert share(rows + 1, 0) == []


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
    # A fresh Ray with a 150 MB object store; 4 epochs of 224x224 crops of 1,437 images are
    # 4 x 216 MB of decoded uint8, 5.8 times the store, read by a consumer slower than decoding, as
    # training is. What is in flight at once (shuffle buffer, decode task outputs, prefetch) is
    # sized to the store, as a user's should be.
    script = textwrap.dedent(f"""
        import resource, time, ray
        from ray._private.internal_api import memory_summary
        from pipelines.config import load_config
        from pipelines.data import build_datasets, epoch_batches
        ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, log_to_driver=False)
        data = load_config({str(CONFIG)!r}, ["data.shards={digits_dir}", "data.train_transform=rrc",
                                             "data.crop_size=224", "data.shuffle_buffer=128",
                                             "data.decode_batch=32", "data.prefetch_batches=1"]).data
        train_ds, _, _ = build_datasets(data, 0)
        rss, total, sizes = [], 0, set()
        for epoch in range(4):
            for b in epoch_batches(train_ds, data, epoch, 0, 64, train=True):
                total += b["image"].numel()
                sizes.add(len(b["label"]))
                time.sleep(0.1)  # Ray Data must hold back, not pile decoded images up
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print("STREAMED", total)
        print("SIZES", *sizes)
        print("RSS", *rss)
        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        print("SUMMARY", summary.replace("\\n", " | "))
    """)
    env = {**os.environ, "RAY_RESNET_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in p.stdout.splitlines() if " " in line}
    assert int(lines["STREAMED"]) >= 5 * 150 * 2**20
    assert lines["SIZES"] == "64"                            # every batch whole
    rss = [int(v) for v in lines["RSS"].split()]
    assert rss[3] - rss[0] < 200 * 2**20, rss               # the consumer does not keep what it read
    summary = lines["SUMMARY"]
    assert "Spilled" not in summary or "Spilled 0 MiB" in summary, summary
