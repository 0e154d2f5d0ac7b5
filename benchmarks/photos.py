"""ImageNet-like JPEGs for the benchmarks: real photographs, not noise.

scikit-learn ships two 427x640 photos; random windows of them, flipped and rescaled to ImageNet's
typical 500x375 (or 375x500), saved at JPEG quality 90, in root/class{0..classes-1}/. varied: half of them
keep that size, the others get a short side of 300 to 450 pixels, so that a batch holds many sizes,
as an ImageNet batch does (the GPU path resamples each size with a call of its own).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images


def make_photos(root: Path, n: int, seed: int = 0, varied: bool = False, classes: int = 4) -> int:
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    total = 0
    for i in range(n):
        src = photos[i % len(photos)]
        short = int(rng.integers(300, 451)) if varied and rng.random() < 0.5 else 375
        w, h = (500, short) if rng.random() < 0.75 else (short, 500)
        scale = rng.uniform(0.6, 1.0)  # a random window of the photo, resized to w x h
        cw, ch = int(src.width * scale), int(src.height * scale)
        if ch / cw > h / w:
            ch = int(cw * h / w)
        else:
            cw = int(ch * w / h)
        x, y = rng.integers(0, src.width - cw + 1), rng.integers(0, src.height - ch + 1)
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        path = root / f"class{i % classes}" / f"img{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total
