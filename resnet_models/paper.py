"""The papers' numbers this project checks itself against, as tables (docs/papers.md shows them
with their sources). He et al. 2015, "Deep Residual Learning for Image Recognition"; He et al.
2016, "Identity Mappings in Deep Residual Networks".

The model-zoo tests read the sizes; pipelines.experiments reports our errors beside the errors.
"""
from __future__ import annotations

# ImageNet nets at 1000 classes, 224x224: depth -> (parameters and GMACs from torchvision's
# models/resnet.py weight metadata, which puts a bottleneck's stride in its 3x3 conv ("v1.5");
# GMACs of the paper's Table 1, stride in the first 1x1 ("v1"), as printed: one decimal).
IMAGENET_SIZES = {18: (11_689_512, 1.814, 1.8), 34: (21_797_672, 3.664, 3.6),
                  50: (25_557_032, 4.089, 3.8), 101: (44_549_160, 7.801, 7.6),
                  152: (60_192_808, 11.514, 11.3)}

# CIFAR nets (option A shortcuts): parameters in millions as printed in the 2015 paper's Table 6,
# and the 2016 paper's for the pre-activation ResNet-164.
CIFAR_PARAMS_M = {"cifar_resnet20": 0.27, "cifar_resnet32": 0.46, "cifar_resnet44": 0.66,
                  "cifar_resnet56": 0.85, "cifar_resnet110": 1.7, "cifar_resnet1202": 19.4,
                  "preact_resnet164": 1.7}

# CIFAR-10 test error in %, 2015 Table 6 (ResNet-110: best of 5 runs; mean 6.61 +- 0.16).
CIFAR_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}

# ImageNet validation top-1 error in %, 10-crop, 2015 Tables 2 and 3: (residual, depth, shortcut).
# Plain nets have no shortcut; they are keyed "A" with Table 2's option-A ResNets.
IMAGENET_TOP1 = {(False, 18, "A"): 27.94, (False, 34, "A"): 28.54, (True, 18, "A"): 27.88, (True, 34, "A"): 25.03,
                 (True, 34, "B"): 24.52, (True, 34, "C"): 24.19, (True, 50, "B"): 22.85, (True, 101, "B"): 21.75,
                 (True, 152, "B"): 21.43}

# ResNet-110 on CIFAR-10, test error in %, median of 5 runs, 2016 Table 1 (shortcuts) and Table 2
# (activation placement); "fails": the paper reports the net does not train.
IDENTITY_110 = {"identity": "6.61", "constant_scaling": "12.35", "exclusive_gating": "8.70",
                "shortcut_only_gating": "6.91", "conv1x1": "12.22", "dropout": "fails",
                "bn_after_add": "8.17", "relu_before_add": "7.84", "relu_only_preact": "6.71", "full_preact": "6.37"}
