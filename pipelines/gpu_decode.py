"""Decoding and augmenting on the training device (data.decode=gpu): encoded JPEG bytes in, a
normalised batch out. No Ray calls here; tests run it with the CPU as the device.

    augment = BatchAugment(cfg.data, train=True, device=device, rng=np.random.default_rng(...))
    x, y, skipped = augment(batch)     # batch: {"image": [bytes, ...], "label": int64 tensor, "key": [...]}

Ray Data reads, shuffles and splits the shards as it does for CPU decoding, but hands each worker
the encoded bytes. The worker decodes the whole batch in one call (nvJPEG on a GPU) and applies the
transforms as a few batched operations, not a loop of kernels per image:
- every transform here is a crop box followed by a resize to crop_size: RandomResizedCrop, the
  paper's random shorter side + random crop, CIFAR's zero padding + random crop, and validation's
  resize + centre crop. The boxes are drawn on the CPU with numpy, from the same distributions as
  torchvision's transforms draw theirs (tests compare the two over many draws);
- one torchvision.ops.roi_align per distinct image size resamples every box of that size to
  crop_size x crop_size: bilinear, averaging ceil(box / crop) samples per output pixel when it
  shrinks (an antialiased resize), and exact pixels when the box is the output's size;
- flip, normalisation and the colour noise run over the whole batch.
"""
from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipelines.codecs import JPEG_MAGIC, decode_jpegs
from pipelines.config import DataSection
from pipelines.data import decode as decode_on_cpu
from pipelines.data import lighting, undecodable

RRC_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect-ratio range


# ---------------------------------------------------------------------------------------------
# Crop boxes: (top, left, height, width) in the decoded image's pixels, one row per image.
# hw: (N, 2) int array of image heights and widths. Boxes may reach outside the image (CIFAR's
# padding): those pixels are zeros, as torchvision pads.

def rrc_boxes(hw: np.ndarray, scale: tuple[float, float], rng: np.random.Generator,
              ratio: tuple[float, float] = RRC_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for every image at once: 10 tries of an area
    fraction in scale and a log-uniform aspect ratio, the first that fits, else the centre crop."""
    n = len(hw)
    height, width = hw[:, :1].astype(np.float64), hw[:, 1:].astype(np.float64)
    target = height * width * rng.uniform(scale[0], scale[1], (n, 10))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, 10)))
    w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))  # round half to even, as round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(1)
    found = fits[np.arange(n), first]
    w, h = w[np.arange(n), first], h[np.arange(n), first]
    height, width = height[:, 0], width[:, 0]
    top = np.floor(rng.random(n) * (height - h + 1))
    left = np.floor(rng.random(n) * (width - w + 1))
    # No try fitted: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    fw = np.where(in_ratio > ratio[1], np.rint(height * ratio[1]), width)
    fh = np.where(in_ratio < ratio[0], np.rint(width / ratio[0]), height)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.where(found, top, (height - h) // 2)
    left = np.where(found, left, (width - w) // 2)
    return np.stack([top, left, h, w], 1)


def resized_shape(hw: np.ndarray, side: np.ndarray | int) -> np.ndarray:
    """torchvision's resize of the shorter side to side: (H', W'), the longer side truncated."""
    h, w = hw[:, 0].astype(np.int64), hw[:, 1].astype(np.int64)
    side = np.broadcast_to(np.asarray(side, dtype=np.int64), h.shape)
    short, long = np.minimum(h, w), np.maximum(h, w)
    new_long = (side * long // short).astype(np.int64)
    return np.stack([np.where(h <= w, side, new_long), np.where(h <= w, new_long, side)], 1)


def scale_boxes(hw: np.ndarray, resized: np.ndarray, top: np.ndarray, left: np.ndarray, crop: int) -> np.ndarray:
    """A crop x crop box at (top, left) of the resized image, in the original image's pixels."""
    sy, sx = hw[:, 0] / resized[:, 0], hw[:, 1] / resized[:, 1]
    return np.stack([top * sy, left * sx, crop * sy, crop * sx], 1)


def paper_boxes(hw: np.ndarray, scale_range: tuple[int, int], crop: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's scale augmentation: shorter side to a random integer in scale_range, then a random
    crop (torchvision's RandomCrop; scale_range starts at crop_size or more, so no padding)."""
    resized = resized_shape(hw, rng.integers(scale_range[0], scale_range[1] + 1, len(hw)))
    top = np.floor(rng.random(len(hw)) * (resized[:, 0] - crop + 1))
    left = np.floor(rng.random(len(hw)) * (resized[:, 1] - crop + 1))
    return scale_boxes(hw, resized, top, left, crop)


def padded_crop_boxes(hw: np.ndarray, crop: int, pad: int, rng: np.random.Generator) -> np.ndarray:
    """CIFAR's augmentation: zero padding of pad pixels on every side, then a random crop."""
    top = rng.integers(0, hw[:, 0] + 2 * pad - crop + 1) - pad
    left = rng.integers(0, hw[:, 1] + 2 * pad - crop + 1) - pad
    return np.stack([top, left, np.full(len(hw), crop), np.full(len(hw), crop)], 1).astype(np.float64)


def centre_boxes(hw: np.ndarray, crop: int, resize: int | None) -> np.ndarray:
    """Validation: shorter side to resize (None: native size), then torchvision's CenterCrop."""
    resized = resized_shape(hw, resize) if resize else hw.astype(np.int64)
    top = np.rint((resized[:, 0] - crop) / 2.0)
    left = np.rint((resized[:, 1] - crop) / 2.0)
    return scale_boxes(hw, resized, top, left, crop)


def draw_boxes(data: DataSection, train: bool, hw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The config's transform as crop boxes (the counterpart of pipelines.data.build_transform)."""
    c = data.crop_size
    if not train:
        return centre_boxes(hw, c, data.val_resize)
    if data.train_transform == "rrc":
        return rrc_boxes(hw, tuple(data.rrc_scale), rng)
    if data.train_transform == "paper":
        return paper_boxes(hw, tuple(data.scale_range), c, rng)
    return padded_crop_boxes(hw, c, 4, rng)


# ---------------------------------------------------------------------------------------------
# Resampling

def crop_resize(images: list[torch.Tensor], boxes: np.ndarray, size: int) -> torch.Tensor:
    """uint8 3 x H x W images (any sizes) and their boxes -> float N x 3 x size x size in 0..255:
    one roi_align per distinct image size. An ImageNet batch holds about a hundred sizes, so the ops
    per size are kept few: the host's time to launch them is most of this function's cost on a GPU."""
    device = images[0].device
    groups = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape[1:])].append(i)
    rois, pads, start = np.zeros((len(images), 5)), [], 0  # per group: (index in the group, x1, y1, x2, y2)
    for (h, w), idx in groups.items():
        b = boxes[idx]
        # Zero padding for boxes that reach outside (CIFAR): roi_align would repeat the edge instead.
        pad = int(np.ceil(max(0.0, -b[:, 0].min(), -b[:, 1].min(), (b[:, 0] + b[:, 2]).max() - h,
                              (b[:, 1] + b[:, 3]).max() - w)))
        top, left = b[:, 0] + pad, b[:, 1] + pad
        rois[start:start + len(idx)] = np.stack([np.arange(len(idx)), left, top, left + b[:, 3], top + b[:, 2]], 1)
        pads.append(pad)
        start += len(idx)
    group_rois = torch.as_tensor(rois, dtype=torch.float32).to(device, non_blocking=True).split(
        [len(idx) for idx in groups.values()])
    resampled = []
    for idx, pad, r in zip(groups.values(), pads, group_rois):
        group = (images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])).float()
        if pad:
            group = F.pad(group, (pad, pad, pad, pad))
        # aligned: pixel centres at +0.5, so a box of the output's size samples exact pixels
        resampled.append(roi_align(group, r, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True))
    if len(resampled) == 1:  # one image size (CIFAR, digits): already in the batch's order
        return resampled[0]
    order = np.concatenate([np.asarray(idx) for idx in groups.values()])  # the batch's rows, group by group
    return torch.cat(resampled).index_select(0, torch.as_tensor(np.argsort(order)).to(device, non_blocking=True))


# ---------------------------------------------------------------------------------------------
# One batch, end to end

class Decoded(NamedTuple):
    """A batch after its decode, before its augmentation (BatchAugment's two stages)."""
    images: list[torch.Tensor]  # the rows that decoded, uint8 3 x H x W on the device
    labels: torch.Tensor        # theirs, on the host
    rows: int                   # rows the batch held, skipped ones included
    skipped: int                # rows that could not be decoded
    idx: np.ndarray | None = None  # the host batch's rows' global numbers, passed through

    def tensors(self) -> list[torch.Tensor]:
        """What is on the device: pipelines.feed keeps it from being reused while still in use."""
        return self.images


class BatchAugment:
    """Encoded rows -> (x: normalised float N x 3 x crop x crop on device, channels_last if asked;
    y: labels on device; how many rows could not be decoded), in two stages that pipelines.feed
    runs on two threads, so that one batch's augmentation is launched while the next is decoding
    (torchvision's batched nvJPEG decode returns only when its batch is decoded):

        decoded = augment.decode(batch)            # the JPEGs, in one call
        x, y, skipped = augment.augment(decoded)   # crop boxes, resampling, flip, normalisation
        x, y, skipped = augment(batch)             # both

    The batch is decoded in one call; if that fails, image by image, each on the CPU if the device's
    decoder cannot read it (PNG, CMYK JPEG), as the CPU path would. A row neither can read is left
    out and counted (data.bad_records=skip) or stops the run naming its key (fail). keep_one: a
    batch with no readable row keeps one blank placeholder labelled -1, so a DDP worker still steps.
    The random draws are all in augment, so the batches are the same whichever thread decoded them.
    """

    def __init__(self, data: DataSection, train: bool, device: torch.device, rng: np.random.Generator,
                 channels_last: bool = False, generator: torch.Generator | None = None):
        self.data, self.train, self.device, self.rng = data, train, device, rng
        self.channels_last, self.generator = channels_last, generator
        # made on the host and copied (a blocking copy): the feed's stream, which reads them, does
        # not wait for the stream of the thread that builds this
        std = torch.tensor(data.std).view(1, 3, 1, 1)
        self.scale = (1 / (255 * std)).to(device)
        self.shift = (torch.tensor(data.mean).view(1, 3, 1, 1) / std).to(device)

    def __call__(self, batch: dict, keep_one: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.augment(self.decode(batch), keep_one)

    def decode(self, batch: dict) -> Decoded:
        images, keep = self.decode_rows(batch["image"], batch["key"])
        labels = torch.as_tensor(batch["label"]).long()[torch.as_tensor(keep, dtype=torch.long)]
        return Decoded([images[i] for i in keep], labels, len(batch["key"]), len(batch["key"]) - len(keep),
                       batch.get("idx"))

    def augment(self, decoded: Decoded, keep_one: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, skipped = decoded.images, decoded.skipped
        if not images:
            c = self.data.crop_size
            x = torch.zeros(1 if keep_one else 0, 3, c, c, device=self.device)
            y = torch.full((len(x),), -1, dtype=torch.long, device=self.device)
            return self.finish(x), y, skipped
        hw = np.array([image.shape[1:] for image in images], dtype=np.int64)
        x = crop_resize(images, draw_boxes(self.data, self.train, hw, self.rng), self.data.crop_size)
        if self.train and self.data.flip:  # torchvision's RandomHorizontalFlip, p = 0.5
            flip = torch.as_tensor(self.rng.random(len(images)) < 0.5).to(self.device, non_blocking=True)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = x * self.scale - self.shift
        if self.train and self.data.pca_lighting and self.generator is not None:
            x = lighting(x, self.data, self.generator)
        return self.finish(x), decoded.labels.to(self.device, non_blocking=True), skipped

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def decode_rows(self, encoded, keys) -> tuple[list, list[int]]:
        """(decoded images on the device, the indices of the rows that decoded)."""
        encoded = list(encoded)
        if all(bytes(e[:3]) == JPEG_MAGIC for e in encoded):
            try:
                return decode_jpegs(encoded, self.device), list(range(len(encoded)))
            except Exception:  # one row the batch decoder cannot read: find it below
                pass
        images, keep = [], []
        for i, (data, key) in enumerate(zip(encoded, keys)):
            try:
                images.append(self.decode_one(data))
                keep.append(i)
            except Exception as e:
                undecodable(self.data, key, e)
                images.append(None)
        return images, keep

    def decode_one(self, data: bytes) -> torch.Tensor:
        if bytes(data[:3]) == JPEG_MAGIC:
            try:
                return decode_jpegs([data], self.device)[0]
            except Exception:  # e.g. a CMYK or progressive JPEG nvJPEG declines: the CPU's decoders
                pass
        return decode_on_cpu(bytes(data)).to(self.device, non_blocking=True)
