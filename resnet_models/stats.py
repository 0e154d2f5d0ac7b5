"""Parameter and multiply-accumulate counts, measured by running the model once."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def model_stats(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> dict:
    """{'params': trainable + frozen parameter count, 'macs': multiply-accumulates per image}.

    MACs come from torch.utils.flop_counter (convolutions and matrix products, FLOPs / 2), the
    convention of torchvision's and the paper's tables. The model runs one image in eval mode, so
    BatchNorm statistics are untouched.
    """
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": params, "macs": counter.get_total_flops() // 2}
