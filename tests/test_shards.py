"""The shard writer loses nothing, labels everything right, survives bad files and resumes exactly."""
import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import shards as S
from pipelines.data import read_shards
from pipelines.shards import check_shards, load_manifest
from pipelines.shards import Options, ShardError, write_shards

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: labels 0, 1, 2
NAMES = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
VAL_WNIDS = ["n01484850", "n01440764", "n01443537", "n01443537", "n01484850", "n01440764"]
ILSVRC_ID = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # the devkit's ids are not sorted


def photo(size=(40, 30), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def save(path: Path, img: Image.Image, fmt="JPEG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def class_folders(root: Path, counts: dict[str, int], fmt="JPEG") -> Path:
    """root/<class>/<i>.jpg (or .png) real encodes, counts[class] images each."""
    for cls, n in counts.items():
        for i in range(n):
            save(root / cls / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}", Image.fromarray(photo(seed=i)), fmt=fmt)
    return root


def bomb_png(path: Path, side=30000) -> None:
    """A valid tiny PNG whose header claims side x side pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", side, side)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    path.write_bytes(bytes(b))


def make_ilsvrc(root: Path, val_layout: str) -> dict:
    """A mini ILSVRC2012 tree with its traps; returns {key: wnid} of the images that must survive."""
    good = {}
    for c, wnid in enumerate(WNIDS):
        for i in range(4):
            key = f"train/{wnid}/{wnid}_{i}.JPEG"
            save(root / key, Image.fromarray(photo(seed=10 * c + i)), quality=90)
            good[key] = wnid
    t = root / "train"
    save(t / WNIDS[0] / "cmyk.JPEG", Image.fromarray(photo(seed=90)).convert("CMYK"))
    save(t / WNIDS[1] / "png.JPEG", Image.fromarray(photo(seed=91)).convert("RGBA"), fmt="PNG")
    save(t / WNIDS[2] / "gray.JPEG", Image.fromarray(photo(seed=92)).convert("L"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save(t / WNIDS[2] / "rotated.JPEG", Image.fromarray(photo((40, 30), seed=93)), exif=exif.tobytes())
    for name, wnid in (("cmyk", 0), ("png", 1), ("gray", 2), ("rotated", 2)):
        good[f"train/{WNIDS[wnid]}/{name}.JPEG"] = WNIDS[wnid]
    whole = (t / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").read_bytes()
    (t / WNIDS[0] / "truncated.JPEG").write_bytes(whole[: len(whole) * 6 // 10])
    (t / WNIDS[1] / "empty.JPEG").write_bytes(b"")
    (t / WNIDS[0] / "corrupt.JPEG").write_bytes(np.random.default_rng(1).bytes(3000))
    bomb_png(t / WNIDS[1] / "bomb.png", side=9000)     # over our --max-pixels
    bomb_png(t / WNIDS[1] / "huge.png", side=30000)    # over PIL's own decompression-bomb limit
    (t / WNIDS[0] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (t / WNIDS[0] / "notes.txt").write_text("not an image")

    for i, wnid in enumerate(VAL_WNIDS, 1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        key = f"val/{wnid}/{name}" if val_layout == "sorted" else f"val/{name}"
        save(root / key, Image.fromarray(photo(seed=100 + i)))
        good[key] = wnid
    if val_layout == "kaggle":
        lines = ["ImageId,PredictionString"] + [
            f"ILSVRC2012_val_{i:08d},{w} 1 2 30 40 {w} 5 6 20 20" for i, w in enumerate(VAL_WNIDS, 1)]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
        (root / "LOC_synset_mapping.txt").write_text(
            "".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))
    elif val_layout == "devkit":
        from scipy.io import savemat
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{ILSVRC_ID[w]}\n" for w in VAL_WNIDS))
        rows = [(ILSVRC_ID[w], w, n, 0) for w, n in zip(WNIDS, NAMES)] + [(1001, "n00001740", "entity", 3)]
        synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                        ("num_children", "O")])
        savemat(data / "meta.mat", {"synsets": synsets})
    return good


def rows(out: Path, split: str) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for shard in manifest["splits"][split]["shards"]
            for r in pq.read_table(out / shard["file"]).to_pylist()]


@pytest.mark.parametrize("val_layout, workers", [("kaggle", 1), ("devkit", 2), ("sorted", 1)])
def test_imagenet_every_good_image_once_with_its_label(tmp_path, val_layout, workers):
    root, out = tmp_path / "ILSVRC", tmp_path / "shards"
    good = make_ilsvrc(root, val_layout)
    devkit = root / "ILSVRC2012_devkit_t12" if val_layout == "devkit" else None
    write_shards(S.scan_imagenet(root, devkit=devkit), out, Options(rows_per_shard=5), workers=workers)

    stored = rows(out, "train") + rows(out, "val")
    assert sorted(r["key"] for r in stored) == sorted(good)  # each exactly once
    for r in stored:
        assert r["class_id"] == good[r["key"]] and r["label"] == WNIDS.index(good[r["key"]])
        img = Image.open(io.BytesIO(r["image"]))
        img.load()
        assert img.mode == "RGB" and img.format == "JPEG" and (img.height, img.width) == (r["height"], r["width"])
        original = (root / r["key"]).read_bytes()
        plain = not any(t in r["key"] for t in ("cmyk", "png", "gray", "rotated"))
        assert (r["image"] == original) == plain  # good RGB JPEGs are kept byte for byte
    by_key = {r["key"]: r for r in stored}
    assert (by_key[f"train/{WNIDS[2]}/rotated.JPEG"]["height"], by_key[f"train/{WNIDS[2]}/rotated.JPEG"]["width"]) == (40, 30)

    manifest = load_manifest(str(out))
    reasons = {Path(x["key"]).name: x["reason"] for x in manifest["skipped"]}
    assert set(reasons) == {"truncated.JPEG", "empty.JPEG", "corrupt.JPEG", "bomb.png", "huge.png"}
    assert reasons["truncated.JPEG"] == "truncated" and reasons["empty.JPEG"] == "empty file"
    assert reasons["bomb.png"].startswith("too large: 9000x9000 pixels, over --max-pixels")
    assert reasons["huge.png"].startswith("too large: Image size (900000000 pixels)")
    assert reasons["corrupt.JPEG"].startswith("cannot decode")
    assert {Path(x["key"]).name for x in manifest["ignored"]} == {".DS_Store", "notes.txt"}
    assert [c["id"] for c in manifest["classes"]] == WNIDS
    if val_layout != "sorted":
        assert [c["name"] for c in manifest["classes"]] == NAMES
    assert manifest["splits"]["train"]["rows"] == 16 and manifest["splits"]["val"]["rows"] == 6
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            assert pq.read_metadata(out / shard["file"]).num_rows == shard["rows"]
    assert len({r["label"] for r in rows(out, "train")[:5]}) > 1  # shards mix classes


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    root = tmp_path / "ILSVRC"
    make_ilsvrc(root, "sorted")
    source = S.scan_imagenet(root)
    opts = Options(rows_per_shard=4, seed=7)
    reference = tmp_path / "reference"
    write_shards(source, reference, opts)

    out = tmp_path / "resumed"
    real_encode, calls = S.encode, []

    def dies_midway(*args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt  # a kill in the middle of the third shard
        return real_encode(*args)

    monkeypatch.setattr(S, "encode", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_shards(source, out, opts)
    monkeypatch.setattr(S, "encode", real_encode)
    written = sorted(p.relative_to(out) for p in out.glob("*/part-*.parquet"))
    assert len(written) == 2 and not (out / "manifest.json").exists()
    for p in written:  # what a killed run leaves is whole
        assert (out / p).read_bytes() == (reference / p).read_bytes()
    (out / "train" / ".part-00002.parquet.tmp-999").write_bytes(b"half a shard")

    write_shards(source, out, opts, workers=2)
    files = lambda d: sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and ".progress" not in p.parts)
    assert files(out) == files(reference)
    for p in files(reference):
        assert (out / p).read_bytes() == (reference / p).read_bytes(), p

    with pytest.raises(ShardError, match="other options"):
        write_shards(source, out, Options(rows_per_shard=4, seed=8))


def test_max_side_reencodes_only_large_images(tmp_path):
    root = tmp_path / "folder"
    save(root / "a" / "big.jpg", Image.fromarray(photo((500, 375), seed=1)), quality=90)
    save(root / "a" / "small.jpg", Image.fromarray(photo((100, 75), seed=2)), quality=90)
    save(root / "b" / "big2.jpg", Image.fromarray(photo((375, 500), seed=3)), quality=90)
    save(root / "b" / "small2.jpg", Image.fromarray(photo((60, 80), seed=4)), quality=90)
    out = tmp_path / "shards"
    write_shards(S.scan_folder(root, 0.5, 0), out, Options(max_side=256, quality=80))
    stored = {r["key"]: r for r in rows(out, "train") + rows(out, "val")}
    assert (stored["a/big.jpg"]["width"], stored["a/big.jpg"]["height"]) == (256, 192)
    assert (stored["b/big2.jpg"]["width"], stored["b/big2.jpg"]["height"]) == (192, 256)
    assert stored["a/small.jpg"]["image"] == (root / "a" / "small.jpg").read_bytes()


def test_folder_with_train_and_val_subfolders(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("val", 2)):
        class_folders(root / split, {"cat": n, "dog": n}, fmt="PNG")
    save(root / "train" / "loose.jpg", Image.fromarray(photo()))
    out = tmp_path / "shards"
    m = write_shards(S.scan_folder(root, 0.1, 0), out)
    assert m["splits"]["train"]["rows"] == 6 and m["splits"]["val"]["rows"] == 4
    assert {(r["key"].split("/")[1], r["label"]) for r in rows(out, "val")} == {("cat", 0), ("dog", 1)}
    assert m["ignored"] == [{"key": "train/loose.jpg", "reason": "not in a class folder"}]


def test_folder_split_is_stratified_and_seeded(tmp_path):
    root = class_folders(tmp_path / "folder", {"a": 10, "b": 10})
    one = S.scan_folder(root, 0.2, seed=3)
    assert sorted(i.label for i in one.splits["val"]) == [0, 0, 1, 1]
    assert [i.key for i in S.scan_folder(root, 0.2, seed=3).splits["val"]] == [i.key for i in one.splits["val"]]
    assert len(one.splits["train"]) + len(one.splits["val"]) == 20


def test_digits_round_trip(tmp_path):
    out = tmp_path / "digits"
    m = write_shards(S.load_digits_source(32, seed=0), out)
    assert m["splits"]["train"]["rows"] == 1437 and m["splits"]["val"]["rows"] == 360
    val = rows(out, "val")
    assert sorted(np.bincount([r["label"] for r in val])) == [35, 35, 36, 36, 36, 36, 36, 36, 37, 37]
    from sklearn.datasets import load_digits
    d = load_digits()
    r = val[0]
    i = int(r["key"].split("/")[1])
    img = np.asarray(Image.open(io.BytesIO(r["image"])))
    assert img.shape == (32, 32, 3) and r["label"] == d.target[i]
    small = np.asarray(Image.fromarray(img).resize((8, 8), Image.BOX).convert("L"), dtype=float)
    assert np.corrcoef(small.ravel(), d.images[i].ravel())[0, 1] > 0.9  # the same digit


def test_cifar10_round_trip_from_the_python_tarball(tmp_path):
    rng = np.random.default_rng(0)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    originals = {}
    with tarfile.open(tar_path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, 3).tolist()
            files = [f"{name}_{j}.png".encode() for j in range(3)]
            add(name, {b"data": data, b"labels": labels, b"filenames": files, b"batch_label": b"x"})
            for j in range(3):
                originals[f"{name}/{files[j].decode()}"] = (data[j].reshape(3, 32, 32).transpose(1, 2, 0), labels[j])
        add("batches.meta", {b"label_names": [f"class{k}".encode() for k in range(10)]})
    out = tmp_path / "shards"
    m = write_shards(S.load_cifar10(tar_path), out)
    assert m["splits"]["train"]["rows"] == 15 and m["splits"]["val"]["rows"] == 3
    for r in rows(out, "train") + rows(out, "val"):
        pixels, label = originals[r["key"]]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["image"]))), pixels)  # lossless
        assert r["label"] == label and r["class_id"] == f"class{label}"
    with pytest.raises(ShardError, match="missing data_batch_1"):
        S.load_cifar10(tmp_path)
    # a path that is not there, and an archive cut short: said, not a traceback
    with pytest.raises(ShardError, match="cifar.tar.gz: no such file or folder; --source cifar10 expects"):
        S.load_cifar10(tmp_path / "cifar.tar.gz")
    (tmp_path / "cut.tar.gz").write_bytes(tar_path.read_bytes()[:5000])
    with pytest.raises(ShardError, match="cut.tar.gz: not a tar archive that can be read whole; --source cifar10"):
        S.load_cifar10(tmp_path / "cut.tar.gz")


def test_reading_checks_every_shard_against_the_manifest(tmp_path):
    out = tmp_path / "digits"
    write_shards(S.load_digits_source(16, 0), out, Options(rows_per_shard=500))
    assert len(check_shards(str(out), "train", verify="sha256")) == 3
    shard = out / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    check_shards(str(out), "train")  # same size and footer: only the checksum can tell
    with pytest.raises(ShardError, match="part-00001.parquet: SHA-256 differs"):
        check_shards(str(out), "train", verify="sha256")
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ShardError, match="part-00001.parquet: .* bytes, the manifest records"):
        check_shards(str(out), "train")
    shard.unlink()
    with pytest.raises(ShardError, match="part-00001.parquet: missing"):
        read_shards(str(out), "train")
    with pytest.raises(ShardError, match="manifest.json: cannot read it"):
        check_shards(str(tmp_path / "nowhere"), "train")


def test_read_shards_streams_every_row(tmp_path, ray_session):
    out = tmp_path / "digits"
    write_shards(S.load_digits_source(16, 0), out, Options(rows_per_shard=500))
    ds = read_shards(str(out), "train")
    keys = [r["key"] for r in ds.select_columns(["key"]).iter_rows()]
    assert len(keys) == len(set(keys)) == 1437


def test_cli_summary_and_errors(run_cli, tmp_path):
    p = run_cli("pipelines.shards", "--source", "digits", "--out", str(tmp_path / "d"), "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert "wrote 1,797 images (train 1,437, val 360) in 2 shards" in p.stderr
    # run again: nothing left to write, and it does not claim to have written it
    p = run_cli("pipelines.shards", "--source", "digits", "--out", str(tmp_path / "d"), "--workers", "1")
    assert p.returncode == 0 and "1,797 images (train 1,437, val 360) in 2 shards, 2.0 MiB, 10 classes, all " \
        "written before\n" in p.stderr and "wrote" not in p.stderr, p.stderr
    p = run_cli("pipelines.shards", "--source", "imagenet", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "none: no such folder; --source imagenet" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "none").mkdir()
    p = run_cli("pipelines.shards", "--source", "imagenet", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "none: no train/ folder" in p.stderr
    p = run_cli("pipelines.shards", "--source", "folder", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "--source folder needs --root PATH" in p.stderr


def test_a_changed_class_list_is_not_resumed_into(tmp_path):
    root = class_folders(tmp_path / "folder", {"b": 4, "c": 4})
    out = tmp_path / "shards"
    write_shards(S.scan_folder(root, 0.5, 0), out, Options(rows_per_shard=2))
    (out / "train" / "part-00001.parquet").unlink()
    (root / "a").mkdir()  # an empty class folder shifts every label
    with pytest.raises(ShardError, match="other options"):
        write_shards(S.scan_folder(root, 0.5, 0), out, Options(rows_per_shard=2))


def test_symlinked_class_folders_and_extra_top_level_folders(tmp_path):
    real = class_folders(tmp_path / "real", {"cat": 2, "dog": 2})
    root = tmp_path / "subset"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for cls in ("cat", "dog"):
            (root / split / cls).symlink_to(real / cls, target_is_directory=True)
    (root / "test").mkdir()
    (real / "cat" / "loop").symlink_to(real, target_is_directory=True)  # a cycle
    source = S.scan_folder(root, 0.1, 0)
    assert [c for c, _ in source.classes] == ["cat", "dog"]
    assert len(source.splits["train"]) == len(source.splits["val"]) == 4
    assert {"key": "test", "reason": "not train/ or val/"} in source.ignored
    (root / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(ShardError, match="has train/ but no val/"):
        S.scan_folder(root, 0.1, 0)


def test_images_that_decode_but_cannot_be_stored_are_skipped(tmp_path):
    root = class_folders(tmp_path / "folder", {"a": 1, "b": 2})
    save(root / "a" / "wide.png", Image.new("RGB", (70000, 2)), fmt="PNG")  # past JPEG's 65,535
    m = write_shards(S.scan_folder(root, 0.5, 0), tmp_path / "out")
    assert [x["key"] for x in m["skipped"]] == ["a/wide.png"]
    assert m["skipped"][0]["reason"].startswith("cannot decode: OSError")


def test_a_split_that_cannot_be_stratified_says_why(tmp_path):
    root = class_folders(tmp_path / "folder", {"a": 1, "b": 3})
    with pytest.raises(ShardError, match="smallest class: 1"):
        S.scan_folder(root, 0.5, 0)


def test_flipped_bytes_in_a_shard_stop_the_read_naming_the_shard_and_row_group_or_skip_its_rows(tmp_path):
    """The same size, 32 bytes flipped in the middle: the size check passes, the pages' CRCs do not.
    With data.bad_records=skip the damaged row group's rows are skipped and counted, never decoded."""
    import pyarrow.fs
    from pipelines.data import _read_row_groups
    out = tmp_path / "shards"
    write_shards(S.load_digits_source(32, 0), out, Options(rows_per_shard=512), progress=None)
    entry = load_manifest(str(out))["splits"]["train"]["shards"][0]
    path = out / entry["file"]
    fs = pyarrow.fs.LocalFileSystem()
    groups = list(range(pq.ParquetFile(path).num_row_groups))
    assert sum(len(t) for t in _read_row_groups(fs, str(path), groups, None)) == entry["rows"]  # whole: reads
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 32] = bytes(b ^ 0xFF for b in data[middle:middle + 32])
    path.write_bytes(bytes(data))
    check_shards(str(out), "train", verify="size")  # the same size: only the read can tell
    with pytest.raises(ShardError, match=rf"{path}: row group \d of {len(groups)} is damaged .*CRC.*; rewrite the "
                                         r"shards \(python -m pipelines.shards\), or set data.bad_records=skip"):
        list(_read_row_groups(fs, str(path), groups, None))

    from pipelines.config import DataSection
    from pipelines.data import DecodeAugment
    tables = list(_read_row_groups(fs, str(path), groups, ["image", "label", "key"], skip_damaged=True))
    assert sum(len(t) for t in tables) == entry["rows"]
    damaged = [g for g, t in zip(groups, tables) if t["key"][0].as_py().startswith(f"{path} row group")]
    assert len(damaged) == 1 and tables[damaged[0]]["key"][1].as_py() == f"{path} row group {damaged[0]} row 1"
    rows = tables[damaged[0]].to_pydict()
    decoded = DecodeAugment(DataSection(crop_size=32), train=False).decode_rows(
        {k: np.asarray(v, dtype=object) for k, v in rows.items()})
    assert (decoded["label"] == -1).all()  # each one a placeholder the epoch counts as skipped
    with pytest.raises(ShardError, match=f"{path} row group {damaged[0]} row 0: cannot decode"):
        DecodeAugment(DataSection(crop_size=32, bad_records="fail"), train=False).decode_rows(
            {k: np.asarray(v[:1], dtype=object) for k, v in rows.items()})


def test_a_killed_writer_takes_its_pool_workers_with_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from tests.conftest import ROOT

    def children(pid: int) -> set[int]:
        found = set()
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found

    writer = subprocess.Popen([sys.executable, "-m", "pipelines.shards", "--source", "digits", "--image-size", "512",
                               "--rows-per-shard", "8", "--workers", "2", "--out", str(tmp_path / "out")],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(workers := children(writer.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(workers) >= 2, "the pool never started"
        time.sleep(1)  # writing shards now
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        deadline = time.time() + 10
        while (alive := {p for p in workers if os.path.exists(f"/proc/{p}")
                         and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"}) \
                and time.time() < deadline:
            time.sleep(0.2)
        assert not alive, f"pool workers {alive} outlived the killed writer"
    finally:
        writer.kill()


def test_the_same_shards_give_the_same_dataset_digest_and_other_shards_another(tmp_path):
    from pipelines.tracking import dataset_digest
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_shards(S.load_digits_source(32, seed), tmp_path / name, Options(rows_per_shard=512), progress=None)
        digests.append(dataset_digest(load_manifest(str(tmp_path / name))["splits"]["train"]))
    assert digests[0] == digests[1] != digests[2] and len(digests[0]) == 32
