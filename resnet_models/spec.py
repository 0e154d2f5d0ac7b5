"""What a model is: one typed, validated description shared by the model zoo and ray_config.yaml.

A ModelConfig names a network without building it, so configs, sweeps and error messages can be
checked on any machine before a cluster is involved. Names like "cifar_resnet56" are shorthand
for one of these (see `parse_name`).
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                   50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                   152: ("bottleneck", (3, 8, 36, 3))}
CIFAR_PAPER_DEPTHS = (20, 32, 44, 56, 110, 1202)      # 6n+2, basic blocks (He et al. 2015, Table 6)
CIFAR_PREACT_DEPTHS = (164, 1001)                     # 9n+2, bottlenecks (He et al. 2016)

# Activation placements of "Identity Mappings in Deep Residual Networks", Fig. 4.
UNITS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
# Shortcut variants of the same paper, Fig. 2 (conv1x1 is the 2015 paper's option C).
SHORTCUT_VARIANTS = ("identity", "constant_scaling", "exclusive_gating", "shortcut_only_gating",
                     "conv1x1", "dropout")


class ModelSpecError(ValueError):
    """A model description that names no valid network; says which key, its value, what is valid."""

    def __init__(self, key: str, value, accepted: str):
        self.key, self.value = key, value
        super().__init__(f"{key}={value}: {accepted}")


class ModelConfig(BaseModel):
    """One ResNet or plain net. Unset choices (None / "auto") take the family's paper default."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    family: Literal["cifar", "imagenet"] = "cifar"
    depth: int = 20
    residual: bool = True                 # False: the plain twin, same layers, no shortcuts
    block: Literal["auto", "basic", "bottleneck"] = "auto"
    unit: Literal[UNITS] = "original"
    shortcut: Literal["A", "B", "C"] | None = None   # None: A for CIFAR basic nets, else B
    shortcut_variant: Literal[SHORTCUT_VARIANTS] = "identity"
    bottleneck_stride: Literal["3x3", "1x1"] = "3x3"  # 3x3: torchvision "v1.5"; 1x1: the paper, "v1"
    zero_init_residual: bool = False      # the branch's last BN (gamma) or, pre-activation, conv starts at 0
    shortcut_scale: float = Field(0.5, gt=0)   # constant_scaling: shortcut multiplier
    residual_scale: float = Field(0.5, gt=0)   # constant_scaling: branch multiplier (the paper: 0.5 or 1)
    gate_bias: float = -6.0                    # gating variants: initial bias of the 1x1 gate conv
    shortcut_dropout: float = Field(0.5, ge=0, lt=1)  # dropout variant: drop probability on the shortcut

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        self.resolved()
        return self

    @property
    def name(self) -> str:
        prefix = "cifar_" if self.family == "cifar" else ""
        preact = "preact_" if self.unit == "full_preact" else ""
        return f"{prefix}{preact}{'resnet' if self.residual else 'plain'}{self.depth}"

    def resolved(self) -> "ResolvedModel":
        """Block type, stage sizes and shortcut option; raises ModelSpecError on any bad combination."""
        if self.family == "imagenet":
            if self.depth not in IMAGENET_DEPTHS:
                raise ModelSpecError("depth", self.depth,
                                     "ImageNet ResNets have depth 18, 34, 50, 101 or 152")
            natural, stages = IMAGENET_DEPTHS[self.depth]
            if self.block not in ("auto", natural):
                raise ModelSpecError("block", self.block,
                                     f"ImageNet depth {self.depth} uses {natural} blocks (or auto)")
            block = natural
        else:
            block, stages = _cifar_layout(self.depth, self.block)
        shortcut = self.shortcut or ("A" if self.family == "cifar" and block == "basic" else "B")
        if not self.residual and self.shortcut_variant != "identity":
            raise ModelSpecError("shortcut_variant", self.shortcut_variant,
                                 "plain nets have no shortcuts; use identity or residual=true")
        if self.shortcut_variant == "conv1x1":
            if self.shortcut not in (None, "C"):
                raise ModelSpecError("shortcut", self.shortcut, "shortcut_variant=conv1x1 projects "
                                     "every shortcut, which is option C; use C or leave it unset")
            shortcut = "C"
        if self.shortcut_variant in ("exclusive_gating", "shortcut_only_gating") and shortcut == "C":
            raise ModelSpecError("shortcut", shortcut, f"{self.shortcut_variant} gates identity "
                                 "shortcuts; use option A or B")
        if self.zero_init_residual and not self.residual:
            raise ModelSpecError("zero_init_residual", True, "a plain net has no shortcut to carry the "
                                 "signal past a zeroed branch; use it with residual=true")
        if self.zero_init_residual and self.unit == "relu_before_add":
            raise ModelSpecError("zero_init_residual", True, "in relu_before_add units a ReLU ends the "
                                 "branch, and a zeroed input to it never gets a gradient; use another unit")
        if not 0.0 <= self.shortcut_dropout < 1.0:
            raise ModelSpecError("shortcut_dropout", self.shortcut_dropout, "a probability in [0, 1)")
        return ResolvedModel(block=block, stages=stages, shortcut=shortcut)


class ResolvedModel(BaseModel):
    block: Literal["basic", "bottleneck"]
    stages: tuple[int, ...]
    shortcut: Literal["A", "B", "C"]


def _cifar_layout(depth: int, block: str) -> tuple[str, tuple[int, int, int]]:
    # Three stages of n units: 2 convs each (6n+2) or 3 convs each (9n+2), plus stem and classifier.
    per_unit = {"basic": 2, "bottleneck": 3}
    if block == "auto":  # the 2015 paper's 6n+2 basic nets first; 9n+2 bottlenecks otherwise
        block = "basic" if depth > 2 and (depth - 2) % 6 == 0 else "bottleneck"
    n, rest = divmod(depth - 2, 3 * per_unit[block])
    if n < 1 or rest:
        raise ModelSpecError("depth", depth, "CIFAR ResNets have depth 6n+2 with basic blocks "
                             f"({', '.join(map(str, CIFAR_PAPER_DEPTHS))}, ...) or 9n+2 with "
                             f"bottlenecks ({', '.join(map(str, CIFAR_PREACT_DEPTHS))}, ...)")
    return block, (n, n, n)


_NAME = re.compile(r"^(?P<cifar>cifar_)?(?P<preact>preact_)?(?P<kind>resnet|plain)(?P<depth>\d+)$")


def parse_name(name: str) -> dict:
    """'resnet50' / 'plain34' / 'cifar_resnet110' / 'preact_resnet164' -> ModelConfig fields.

    Without the cifar_ prefix, ImageNet depths (18 ... 152) are ImageNet nets and any other depth
    is a CIFAR net, as the papers name them (ResNet-110, pre-activation ResNet-1001).
    """
    m = _NAME.match(name)
    if not m:
        raise ModelSpecError("name", name, "accepted names look like resnet50, plain34, "
                             "cifar_resnet56, cifar_plain20, preact_resnet164; see list_models()")
    depth = int(m["depth"])
    cifar = bool(m["cifar"]) or depth not in IMAGENET_DEPTHS
    fields = {"family": "cifar" if cifar else "imagenet", "depth": depth,
              "residual": m["kind"] == "resnet"}
    if m["preact"]:
        fields["unit"] = "full_preact"
        if cifar and depth in CIFAR_PREACT_DEPTHS:
            fields["block"] = "bottleneck"  # 164 is also 6n+2, but the follow-up paper's is 9n+2
    return fields


def list_models() -> list[str]:
    """The named networks of both papers (build_model also takes any other valid depth)."""
    imagenet = sorted(IMAGENET_DEPTHS)
    return ([f"resnet{d}" for d in imagenet] + [f"plain{d}" for d in imagenet]
            + [f"preact_resnet{d}" for d in imagenet]
            + [f"cifar_resnet{d}" for d in CIFAR_PAPER_DEPTHS]
            + [f"cifar_plain{d}" for d in CIFAR_PAPER_DEPTHS]
            + [f"preact_resnet{d}" for d in (110, *CIFAR_PREACT_DEPTHS)])
