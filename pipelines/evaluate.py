"""Test a trained ResNet on the validation split as the paper does:
    python -m pipelines.evaluate --checkpoint PATH | --model-uri URI [--shards DIR] [--mode MODE] [key=value ...]

Modes (He et al. 2015, Sec. 3.4, Tables 3 and 4):
  single      one view per image: the training's own validation transform (shorter side
              data.val_resize, centre crop data.crop_size), so it reproduces the training's val_error.
  10crop      the four corners and the centre, --crop pixels square, of the image with its shorter
              side at --resize, and their horizontal flips.
  multiscale  the whole image with its shorter side at each of --scales, and its flip, through the
              network fully convolutionally: the ResNets end in global average pooling, so any size
              goes in, and averaging the pooled features before the linear fc is the same as applying
              fc at every position and averaging (the paper's fully-convolutional form).

An image's score is the mean over its views of the softmax probabilities (the authors' released
models tested on their "prob" output); top-1 and top-5 error are of that mean. Probabilities rather
than logits: each view then has one vote of the same weight, whatever the scale of its logits.

Flipped views come only when the model trained with flips (data.flip), as the paper's did: the
digits train without them (a mirrored digit is another glyph). --flip / --no-flip decide otherwise.

Reads top to bottom: the model and the config it trained with (a checkpoint directory, a run
directory's best checkpoint, or an MLflow model URI with its run's config.yaml) -> the views ->
Ray Data: the shards, decoded in CPU tasks, scored in actors that hold the model (scaling.num_workers
of them, with cpus_per_worker / gpus_per_worker each; on CPUs alone Ray Data runs the decoding in the
actors too) -> top-1 and top-5 error, every image counted once.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from pipelines.checkpoint import find_checkpoint
from pipelines.config import Config, ConfigError, DataSection, cli_errors, load_config
from pipelines.data import DecodeAugment, read_shards, shards_dir, to_device
from pipelines.recipe import numerics
from pipelines.runtime import check_cluster, start_ray
from pipelines.shards import ShardError, load_manifest
from pipelines.tracking import fluent_mlflow, mlflow_client, quiet_mlflow
from resnet_models import build_model

MODES = ("single", "10crop", "multiscale")
PAPER_SCALES = (224, 256, 384, 480, 640)  # Table 4's shorter sides, for 224-pixel training crops
PAPER_CROP, PAPER_RESIZE = 224, 256       # Table 3's 10-crop: 224 crops of the 256-shorter-side image


@dataclass(frozen=True)
class Views:
    """What each image is tested on."""
    mode: str = "single"
    crop: int | None = None         # 10crop: the side of the five square crops
    resize: int | None = None       # 10crop: the shorter side before cropping; None: the native size
    scales: tuple[int, ...] = ()    # multiscale: the shorter sides
    flip: bool = False              # 10crop and multiscale: each view's mirror image too

    @property
    def count(self) -> int:
        base = {"single": 1, "10crop": 5, "multiscale": len(self.scales)}[self.mode]
        return base * 2 if self.flip and self.mode != "single" else base


def choose_views(data: DataSection, mode: str, crop: int | None = None, resize: int | None = None,
                 scales: list[int] | None = None, flip: bool | None = None) -> Views:
    """The views for a mode, with defaults scaled from the training crop as the paper's are from 224:
    10crop takes data.crop_size crops after data.val_resize, or, with no val_resize (the digits: native
    32x32), crops of 224/256 of data.crop_size (28) from the native image; multiscale takes the paper's
    shorter sides times data.crop_size / 224 ([32, 37, 55, 69, 91] for 32-pixel crops)."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode}: one of {', '.join(MODES)}")
    if mode != "10crop" and (crop or resize):
        raise ConfigError(f"--crop/--resize: for --mode 10crop; {mode} takes data.crop_size and "
                          "data.val_resize (override them as key=value)")
    if mode != "multiscale" and scales:
        raise ConfigError(f"--scales: for --mode multiscale, not {mode}")
    flip = data.flip if flip is None else flip
    if mode == "single":
        return Views()
    if mode == "10crop":
        resize = resize or data.val_resize
        crop = crop or (data.crop_size if resize else round(data.crop_size * PAPER_CROP / PAPER_RESIZE))
        if resize and crop > resize:
            raise ConfigError(f"--crop {crop}: larger than the shorter side --resize {resize}; "
                              "give a crop of at most the resized side")
        return Views(mode, crop=crop, resize=resize, flip=flip)
    scales = tuple(scales or (round(s * data.crop_size / PAPER_CROP) for s in PAPER_SCALES))
    if min(scales) < 8:
        raise ConfigError(f"--scales {','.join(map(str, scales))}: shorter sides of at least 8 pixels")
    return Views(mode, scales=scales, flip=flip)


# ---------------------------------------------------------------------------------------------
# Views and scores (no Ray here: tests drive these directly)

def make_views(x: torch.Tensor, v: Views) -> list[torch.Tensor]:
    """The views of N same-sized normalised images (N x 3 x H x W): a list of N x 3 x h x w."""
    if v.mode == "single":
        return [x]
    if v.mode == "10crop":
        if min(x.shape[-2:]) < v.crop:
            raise ValueError(f"--crop {v.crop}: larger than an image of {x.shape[-1]}x{x.shape[-2]}; "
                             "give a smaller --crop or a --resize of at least the crop")
        views = list(TF.five_crop(x, [v.crop, v.crop]))
    else:
        views = [TF.resize(x, [s], antialias=True) for s in v.scales]
    return views + [TF.horizontal_flip(u) for u in views] if v.flip else views


def mean_scores(model: nn.Module, images: list[torch.Tensor], v: Views, max_batch: int = 64,
                amp: torch.dtype | None = None) -> torch.Tensor:
    """N x classes: for each normalised image (3 x H x W; sizes may differ), the mean of its views'
    softmax probabilities. Views of one size go through the network together, max_batch at a time."""
    by_size = defaultdict(list)
    for i, x in enumerate(images):
        for view in make_views(x[None], v):
            by_size[tuple(view.shape[-2:])].append((i, view))
    model.eval()
    total = None
    device = images[0].device
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for items in by_size.values():
            for j in range(0, len(items), max_batch):
                chunk = items[j:j + max_batch]
                p = model(torch.cat([u for _, u in chunk])).float().softmax(1)
                if total is None:
                    total = torch.zeros(len(images), p.size(1), device=device)
                total.index_add_(0, torch.tensor([i for i, _ in chunk], device=device), p)
    return total / v.count


def count_hits(top: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) from each image's classes ranked best first (N x k) and its label."""
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum())


# ---------------------------------------------------------------------------------------------
# Ray Data stages

class Decode(DecodeAugment):
    """map_batches task: encoded rows -> {"image": uint8 H x W x 3, "label", "key"}.

    single: the training's validation transform (fixed size, stacked). 10crop: the shorter side
    resized (as training's validation resize); multiscale: the native size, resized per scale
    by the scorer. Those sizes may differ between images, so rows go through DecodeAugment (and its
    bad-record handling: data.bad_records) one at a time and leave as a ragged column. Rows that
    could not be decoded (label -1) are left out here; the result counts them as skipped.
    """

    def __init__(self, data: DataSection, views: Views):
        super().__init__(data, train=False)
        self.views = views
        if views.mode != "single":
            self.transform = T.Resize(views.resize, antialias=True) if views.resize else torch.nn.Identity()
            self.min_side = views.resize or max(views.scales, default=None)

    def __call__(self, batch: dict) -> dict:
        if self.views.mode == "single":
            out = self.decode_rows(batch)
            ok = out["label"] >= 0
            return out if ok.all() else {k: v[ok] for k, v in out.items()}
        rows = [self.decode_rows({k: batch[k][i:i + 1] for k in ("image", "label", "key")})
                for i in range(len(batch["key"]))]
        rows = [r for r in rows if r["label"][0] >= 0]
        if not rows:  # every record bad: the empty batch training's decoding gives
            return self.decode_rows({k: batch[k][:0] for k in ("image", "label", "key")})
        images = np.empty(len(rows), dtype=object)  # one array per image, not one 4-d array
        for i, r in enumerate(rows):
            images[i] = r["image"][0]
        return {"image": images, "label": np.asarray([r["label"][0] for r in rows], dtype=np.int64),
                "key": np.asarray([r["key"][0] for r in rows], dtype=object)}


class Scorer:
    """map_batches actor: decoded images -> {"top": the 5 best classes of each image's mean score,
    "label", "key"}. It holds the model on its device, so the weights load once per actor."""

    def __init__(self, model: nn.Module, cfg: Config, views: Views, max_batch: int):
        self.device = torch.device("cuda" if cfg.scaling.gpus_per_worker else "cpu")
        num = numerics(cfg, self.device)
        self.amp, self.channels_last = num.amp, num.channels_last
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.data, self.views, self.max_batch = cfg.data, views, max_batch
        self.k = min(5, model.fc.out_features)

    def __call__(self, batch: dict) -> dict:
        labels = torch.tensor(batch["label"])  # a copy: Arrow's arrays are read-only
        if not len(labels):
            return {"top": np.zeros((0, self.k), np.int64), "label": batch["label"], "key": batch["key"]}
        images = [to_device({"image": torch.from_numpy(np.array(img))[None], "label": labels[i:i + 1]},
                            self.device, self.data, self.channels_last)[0][0]
                  for i, img in enumerate(batch["image"])]
        try:
            scores = mean_scores(self.model, images, self.views, self.max_batch, self.amp)
        except ValueError as e:  # a crop larger than an image: the user's setting, named
            raise ConfigError(str(e)) from None
        top = scores.topk(self.k, dim=1).indices.cpu()
        return {"top": top.numpy(), "label": batch["label"], "key": batch["key"]}


def evaluate_split(model: nn.Module, cfg: Config, views: Views, max_batch: int) -> dict:
    """Top-1 and top-5 error of the model on cfg.data's validation shards, every image once."""
    import ray
    import ray.data
    try:
        directory = shards_dir(cfg.data)
        manifest = load_manifest(directory)
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    classes, outputs = len(manifest["classes"]), model.fc.out_features
    if classes != outputs:
        raise ConfigError(f"data.shards={directory}: {classes} classes, the model has {outputs} outputs; "
                          "give the shards the model trained on (--shards DIR)")
    ray_line = start_ray(cfg)
    if ray_line:
        print(ray_line, flush=True)
    check_cluster(cfg)
    sc = cfg.scaling
    # Blocks of decode_batch rows, streamed: a shard is one block as read, and a small split (the
    # digits' 360 images are one shard) would otherwise go to one actor, however many there are.
    ds = read_shards(directory, "val", columns=["image", "label", "key"], skip_damaged=cfg.data.bad_records == "skip")
    ds = ds.repartition(target_num_rows_per_block=cfg.data.decode_batch)
    ds = ds.map_batches(Decode(cfg.data, views), batch_size=cfg.data.decode_batch, num_cpus=1)
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"model": model, "cfg": cfg, "views": views,
                                                       "max_batch": max_batch},
                        compute=ray.data.ActorPoolStrategy(min_size=sc.min_workers, max_size=sc.max_workers),
                        batch_size=cfg.data.decode_batch,
                        num_cpus=sc.cpus_per_worker, num_gpus=sc.gpus_per_worker)
    seen, top1, top5 = set(), 0, 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            keys = set(batch["key"].tolist())
            if len(keys) < len(batch["key"]) or seen & keys:
                raise RuntimeError(f"{directory}: an image was scored twice (e.g. {sorted(seen & keys)[:3]})")
            seen |= keys
            hits = count_hits(torch.tensor(batch["top"]), torch.tensor(batch["label"]))
            top1, top5 = top1 + hits[0], top5 + hits[1]
    except ray.exceptions.RayError as e:  # a setting an image cannot take: Ray keeps only the text
        why = re.search(r"ConfigError: (.+)", str(e))
        if why:
            raise ConfigError(why.group(1)) from None
        raise
    n = len(seen)
    return {"images": n, "top1_error": 1 - top1 / max(n, 1), "top5_error": 1 - top5 / max(n, 1),
            "skipped": manifest["splits"]["val"]["rows"] - n, "shards": directory}


# ---------------------------------------------------------------------------------------------
# The model and the config it trained with

def rebuild(trained: dict, weights: dict, where: str) -> nn.Module:
    """The network a run's config describes, with the given weights."""
    try:
        spec = Config.model_validate(trained).model
    except ValueError as e:
        raise ConfigError(f"{where}: the config it trained with does not validate ({e})") from None
    model = build_model(spec, num_classes=weights["fc.weight"].shape[0])
    model.load_state_dict(weights)
    return model


def model_from_checkpoint(path: str) -> tuple[nn.Module, dict, str]:
    """(model, the config it trained with as a dict, where it came from)."""
    state, where = find_checkpoint(path)
    model = rebuild(state["config"], state["model"], f"{where}/state.pt")
    return model, state["config"], f"{state['model_name']}, epoch {state['epoch']}, {where}"


def model_from_mlflow(uri: str, tracking_uri: str) -> tuple[nn.Module, dict, str]:
    """(model, the config it trained with as a dict, where it came from) for an MLflow model URI.

    MLflow 3 stores a PyTorch model as a torch.export program traced at the logged input example's
    image size (data.crop_size), which refuses other sizes (multiscale needs them). Its weights
    therefore go into the network rebuilt from the run's config.yaml, which takes any.
    """
    import mlflow.models
    import mlflow.pytorch
    with fluent_mlflow(tracking_uri):
        try:
            info = mlflow.models.get_model_info(uri)
            weights = mlflow.pytorch.load_model(uri, map_location="cpu").state_dict()
        except Exception as e:
            raise ConfigError(f"{uri}: cannot load the model from {tracking_uri} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}); give runs:/<run_id>/best_model (or "
                              "final_model) or models:/<name>/<version> (or /latest, or @<alias>), and mlflow.tracking_uri=... "
                              "for the store that holds it") from None
    try:
        with tempfile.TemporaryDirectory() as d:
            trained = yaml.safe_load(Path(mlflow_client(tracking_uri).download_artifacts(
                info.run_id, "config.yaml", d)).read_text())
    except Exception as e:
        raise ConfigError(f"{uri}: no config.yaml in its run {info.run_id} ({type(e).__name__}), so its "
                          "network cannot be rebuilt; give a model that pipelines.train logged, or "
                          "--checkpoint PATH") from None
    return rebuild(trained, weights, uri), trained, f"{uri} (run {info.run_id})"


def resolve_config(config_path: str | None, overrides: list[str], trained: dict | None, source: str) -> Config:
    """--config when given, else the config the model trained with (its data settings: shards,
    crop_size, val_resize, mean, std), with the key=value overrides on top."""
    if config_path or trained is None:
        try:
            return load_config(config_path, overrides)
        except ConfigError as e:
            where = config_path or "overrides"
            raise ConfigError(str(e) if str(e).startswith(f"{where}:") else f"{where}: {e}") from None
    try:
        return load_config(None, overrides, base=trained)
    except ConfigError as e:
        raise ConfigError(f"the config {source} trained with, and the overrides: {e}; "
                          "give --config PATH to evaluate with another config") from None


# ---------------------------------------------------------------------------------------------
# The command line

def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive whole number")
    return int(text)


def sides(text: str) -> list[int]:
    try:
        return [positive(v.strip()) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated shorter sides, "
                                         "e.g. 224,256,384,480,640") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate",
                                description="Test a trained ResNet: single crop, 10-crop or multi-scale; "
                                            "top-1 and top-5 error (see pipelines/evaluate.py).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="a run's checkpoint_* directory, or its run directory (the best checkpoint); "
                             "a local path or an s3:// / gs:// URI")
    source.add_argument("--model-uri", metavar="URI",
                        help="an MLflow model: runs:/<run_id>/best_model, models:/NAME/latest, models:/NAME@champion")
    p.add_argument("--shards", metavar="DIR", help="validation shards (default: the model's data.shards)")
    p.add_argument("--mode", choices=MODES, default="single")
    p.add_argument("--crop", type=positive, metavar="N",
                   help="10crop: crop side (default: data.crop_size, or 7/8 of it with no data.val_resize)")
    p.add_argument("--resize", type=positive, metavar="N",
                   help="10crop: shorter side before cropping (default: data.val_resize)")
    p.add_argument("--scales", type=sides, metavar="N,N,...",
                   help="multiscale: shorter sides, e.g. 224,256,384,480,640 (default: those x crop_size/224)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add mirrored views (default: data.flip, whether the model trained with flips)")
    p.add_argument("--batch-size", type=positive, metavar="N", default=64,
                   help="views per forward pass (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--config", metavar="PATH",
                   help="YAML config for the data and cluster settings (default: the one the model trained "
                        "with; for an MLflow model, also where the store is)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own log lines on the console too (the same as run.verbose=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.decode_batch=32")
    args = p.parse_args(argv)
    if args.verbose:
        args.overrides.append("run.verbose=true")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """The results of the command line's evaluation, as written to --out."""
    overrides = args.overrides + ([f"data.shards={args.shards}"] if args.shards else [])
    if not args.verbose:
        quiet_mlflow()
    if args.checkpoint:
        model, trained, source = model_from_checkpoint(args.checkpoint)
    else:
        where = resolve_config(args.config, overrides, None, args.model_uri).mlflow.resolved_uri()
        model, trained, source = model_from_mlflow(args.model_uri, where)
    cfg = resolve_config(args.config, overrides, trained, args.checkpoint or args.model_uri)
    views = choose_views(cfg.data, args.mode, args.crop, args.resize, args.scales, args.flip)
    t0 = time.perf_counter()
    result = evaluate_split(model, cfg, views, args.batch_size)
    return {**asdict(views), "views": views.count, **result, "model": source,
            "seconds": round(time.perf_counter() - t0, 1)}


def summary(r: dict) -> str:
    how = {"single": "1 view", "10crop": f"{r['views']} views of {r['crop']}px"
                     + (f" after resizing to {r['resize']}" if r["resize"] else ""),
           "multiscale": f"{r['views']} views, shorter sides {','.join(map(str, r['scales']))}"}[r["mode"]]
    flips = "" if r["mode"] == "single" else ", with flips" if r["flip"] else ", no flips"
    return (f"{r['mode']}: top-1 error {r['top1_error']:.2%}, top-5 error {r['top5_error']:.2%} on "
            f"{r['images']} images ({how}{flips}; {r['skipped']} skipped) in {r['seconds']}s; {r['model']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with cli_errors():
        result = evaluate(args)
    print(summary(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
