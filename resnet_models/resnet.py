"""ResNets of He et al. 2015 ("Deep Residual Learning") and 2016 ("Identity Mappings"), plain twins.

One residual unit covers basic and bottleneck blocks, all five activation placements of the 2016
paper (Fig. 4) and its shortcut variants (Fig. 2). Module names follow torchvision's
models/resnet.py (conv1, bn1, layer1..4, fc; conv{i}/bn{i}/downsample inside a block), so a
torchvision state_dict loads into the "original" v1.5 nets with strict=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ModelConfig

# The ops around each conv of a unit: (every conv but the last, the last conv, after the addition).
# c = conv{i}, b = bn{i}, r = ReLU. A unit whose first conv's ops start before its "c" is a
# pre-activation unit: those leading ops run once on the unit's input, and a projecting shortcut
# takes their output too (as in the authors' code). After the addition, "b" is the last BN.
UNIT_OPS = {
    "original":         ("cbr", "cb", "r"),    # 2015 paper
    "bn_after_add":     ("cbr", "c", "br"),
    "relu_before_add":  ("cbr", "cbr", ""),
    "relu_only_preact": ("rcb", "rcb", ""),
    "full_preact":      ("brc", "brc", ""),    # 2016 paper's proposal
}


def _pre_ops(unit: str) -> str:
    first = UNIT_OPS[unit][0]
    return first[:first.index("c")]


class ZeroPadShortcut(nn.Module):
    """Option A: identity with strided subsampling and zero-filled extra channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra_channels = stride, extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and x.size(1) > 1
        x = x[:, :, ::self.stride, ::self.stride]
        x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Block(nn.Module):
    """A residual unit (or, with residual=False, the same layers without the shortcut)."""

    def __init__(self, cin: int, width: int, stride: int, cfg: ModelConfig, *, bottleneck: bool,
                 shortcut: str, skip_pre: bool):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        cout = width * self.expansion
        if bottleneck:  # the stride sits in the 3x3 ("v1.5", torchvision) or the first 1x1 ("v1")
            s1, s3 = (stride, 1) if cfg.bottleneck_stride == "1x1" else (1, stride)
            convs = [(cin, width, 1, s1), (width, width, 3, s3), (width, cout, 1, 1)]
        else:
            convs = [(cin, width, 3, stride), (width, width, 3, 1)]
        mid, last, self.post = UNIT_OPS[cfg.unit]
        pre = _pre_ops(cfg.unit)
        self.pre = "" if skip_pre else pre  # the first unit after the stem: the stem did it
        self.ops = [op[len(pre):] if i == 0 else op
                    for i, op in enumerate([mid] * (len(convs) - 1) + [last])]
        for i, (a, b, k, s) in enumerate(convs, 1):
            setattr(self, f"conv{i}", nn.Conv2d(a, b, k, stride=s, padding=k // 2, bias=False))
            ops = (self.pre if i == 1 else "") + self.ops[i - 1]
            if "b" in ops:  # BN normalises the conv's input (pre-activation) or its output
                setattr(self, f"bn{i}", nn.BatchNorm2d(a if ops.index("b") < ops.index("c") else b))
        if "b" in self.post:
            setattr(self, f"bn{len(convs)}", nn.BatchNorm2d(cout))

        self.residual = cfg.residual
        self.variant = cfg.shortcut_variant
        self.cfg = cfg
        self.downsample: nn.Module | None = None
        if cfg.residual and (shortcut == "C" or stride != 1 or cin != cout):
            if shortcut == "A":
                self.downsample = ZeroPadShortcut(stride, cout - cin)
            else:  # the authors' pre-activation code projects without a BN
                proj = [nn.Conv2d(cin, cout, 1, stride=stride, bias=False)]
                self.downsample = nn.Sequential(*proj, *([] if pre else [nn.BatchNorm2d(cout)]))
        # Shortcuts that change shape see the pre-activated input, identity ones the raw input.
        self.shortcut_sees_pre = self.downsample is not None
        if cfg.residual and cfg.shortcut_variant in ("exclusive_gating", "shortcut_only_gating"):
            self.gate = nn.Conv2d(cin, cout, 1, stride=stride, bias=True)

    def _run(self, ops: str, i: int, x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = F.relu(x) if op == "r" else getattr(self, ("conv" if op == "c" else "bn") + str(i))(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._run(self.pre, 1, x)
        f = a
        for i, ops in enumerate(self.ops, 1):
            f = self._run(ops, i, f)
        if self.residual:
            xin = a if self.shortcut_sees_pre else x
            s = self.downsample(xin) if self.downsample is not None else xin
            f = self._combine(s, f, xin)
        return self._run(self.post, len(self.ops), f)

    def _combine(self, s: torch.Tensor, f: torch.Tensor, xin: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if self.variant == "constant_scaling":
            return c.shortcut_scale * s + c.residual_scale * f
        if self.variant in ("exclusive_gating", "shortcut_only_gating"):
            g = torch.sigmoid(self.gate(xin))
            return (1 - g) * s + (g * f if self.variant == "exclusive_gating" else f)
        if self.variant == "dropout":  # a Bernoulli scale on the shortcut, expectation 1 - p
            s = F.dropout(s, c.shortcut_dropout, self.training) * (1 - c.shortcut_dropout)
        return s + f

    def last_layer_of_branch(self) -> nn.Module:
        """The layer ending the residual branch: its last BN, or its last conv (pre-activation)."""
        n, last = len(self.ops), self.ops[-1][-1]
        assert last != "r", "zero init cannot pass a ReLU; ModelConfig refuses relu_before_add"
        return getattr(self, f"bn{n}" if last == "b" else f"conv{n}")


class ResNet(nn.Module):
    """ImageNet layout (7x7 stem, max-pool, 64..512 widths) or CIFAR layout (3x3 stem, 16/32/64)."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 1000):
        super().__init__()
        r = cfg.resolved()
        bottleneck = r.block == "bottleneck"
        if cfg.family == "imagenet":
            widths, stem = (64, 128, 256, 512), 64
            self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            widths, stem = (16, 32, 64), 16
            self.conv1 = nn.Conv2d(3, stem, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for s, (width, count) in enumerate(zip(widths, r.stages)):
            blocks = []
            for b in range(count):
                blocks.append(Block(cin, width, 2 if (s > 0 and b == 0) else 1, cfg,
                                    bottleneck=bottleneck, shortcut=r.shortcut,
                                    skip_pre=(s == 0 and b == 0)))
                cin = blocks[-1].expansion * width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        # Pre-activation nets end with the activation their units start with (BN-ReLU or ReLU).
        self.final_ops = _pre_ops(cfg.unit)
        if "b" in self.final_ops:
            self.final_bn = nn.BatchNorm2d(cin)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.config = cfg

        for m in self.modules():  # He initialisation, as both papers and torchvision
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Block) and hasattr(m, "gate"):
                nn.init.constant_(m.gate.bias, cfg.gate_bias)
            if isinstance(m, Block) and cfg.zero_init_residual:
                nn.init.zeros_(m.last_layer_of_branch().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        for op in self.final_ops:
            x = self.final_bn(x) if op == "b" else F.relu(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
