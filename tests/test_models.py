"""The model zoo is the papers' networks: counts, layer structure, torchvision weights, variants."""
import pytest
import torch
import torchvision
from torch import nn

from resnet_models import ModelConfig, ModelSpecError, build_model, list_models, model_stats
from resnet_models.paper import CIFAR_PARAMS_M, IMAGENET_SIZES
from resnet_models.resnet import Block

# The papers' tables (docs/papers.md has their sources): ImageNet params and GMACs from torchvision
# (v1.5) and the paper's Table 1 (v1); CIFAR params in millions as printed (Table 6; 2016 for 164).
IMAGENET = IMAGENET_SIZES
CIFAR = CIFAR_PARAMS_M


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weighted_depth(model: nn.Module) -> int:
    """Convolutions and the classifier on the main path: what the papers call depth."""
    side = {id(m) for b in model.modules() if isinstance(b, Block)
            for name in ("downsample", "gate") if getattr(b, name, None) is not None
            for m in getattr(b, name).modules()}
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in side for m in model.modules())


@pytest.mark.parametrize("depth", sorted(IMAGENET))
def test_imagenet_params_and_macs_match_torchvision_and_paper(depth):
    params, gmacs_v15, gmacs_v1 = IMAGENET[depth]
    stats = model_stats(build_model(f"resnet{depth}"))
    assert stats["params"] == params
    assert round(stats["macs"] / 1e9, 3) == gmacs_v15
    if depth >= 50:  # v1 moves the stride into the first 1x1: same weights, fewer MACs
        v1 = model_stats(build_model(f"resnet{depth}", bottleneck_stride="1x1"))
        assert v1["params"] == params
        # The paper prints one decimal, rounded down for ResNet-50 (measured 3.858 G).
        assert abs(v1["macs"] / 1e9 - gmacs_v1) / gmacs_v1 < 0.02


@pytest.mark.parametrize("depth", sorted(IMAGENET))
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_outputs(depth):
    torch.manual_seed(depth)
    theirs = getattr(torchvision.models, f"resnet{depth}")(num_classes=100).eval()
    ours = build_model(f"resnet{depth}", num_classes=100).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_params_match_the_papers_tables(name):
    digits = 1 if CIFAR[name] >= 1 else 2  # the tables print 0.27M but 1.7M and 19.4M
    assert round(n_params(build_model(name, num_classes=10)) / 1e6, digits) == CIFAR[name]


def test_preact_resnet1001_is_the_follow_up_papers_size():
    # The follow-up paper prints 10.2M; its architecture (3 x 111 bottlenecks, 16/32/64 widths)
    # counts 10.33M, within 1.5% of it.
    p = n_params(build_model("preact_resnet1001", num_classes=10))
    assert abs(p / 10.2e6 - 1) < 0.015


@pytest.mark.parametrize("name", list_models())
def test_every_named_model_has_its_depth_in_weighted_layers(name):
    model = build_model(name, num_classes=10)
    assert weighted_depth(model) == model.config.depth


def test_plain_twins_have_the_same_layers_without_shortcuts():
    res, plain = build_model("cifar_resnet56", num_classes=10), build_model("cifar_plain56", num_classes=10)
    assert n_params(res) == n_params(plain)  # option A shortcuts have no parameters
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in res.named_parameters()]
    assert not any(getattr(b, "downsample", None) for b in plain.modules() if isinstance(b, Block))
    r34, p34 = build_model("resnet34"), build_model("plain34")
    projections = sum(p.numel() for n, p in r34.named_parameters() if "downsample" in n)
    assert n_params(r34) - n_params(p34) == projections


def test_shortcut_options_a_b_c():
    a, b, c = (build_model("cifar_resnet20", num_classes=10, shortcut=s) for s in "ABC")
    assert n_params(a) < n_params(b) < n_params(c)
    blocks = lambda m: [x for x in m.modules() if isinstance(x, Block)]
    assert sum(x.downsample is not None for x in blocks(b)) == 2      # where the shape changes
    assert all(x.downsample is not None for x in blocks(c))           # everywhere
    assert n_params(build_model("resnet34", shortcut="A")) == 21_797_672 - sum(
        p.numel() for n, p in build_model("resnet34").named_parameters() if "downsample" in n)


def test_bottleneck_stride_placement():
    v15, v1 = build_model("resnet50"), build_model("resnet50", bottleneck_stride="1x1")
    assert (v15.layer2[0].conv1.stride, v15.layer2[0].conv2.stride) == ((1, 1), (2, 2))
    assert (v1.layer2[0].conv1.stride, v1.layer2[0].conv2.stride) == ((2, 2), (1, 1))


UNITS = ["original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact"]
VARIANTS = ["identity", "constant_scaling", "exclusive_gating", "shortcut_only_gating",
            "conv1x1", "dropout"]


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_unit_and_shortcut_variant_trains(unit, variant):
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=7, unit=unit, shortcut_variant=variant)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    # Every parameter takes part (DDP refuses models with unused parameters).
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["preact_resnet164", "preact_resnet50", "resnet50"])
def test_bottleneck_units_use_every_parameter(name):
    model = build_model(name, num_classes=5)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_full_preact_units_are_bn_relu_conv_with_a_final_activation():
    m = build_model("preact_resnet110", num_classes=10)
    block = m.layer2[1]
    assert block.pre == "br" and block.ops == ["c", "brc"] and block.post == ""
    assert m.layer1[0].pre == ""  # the stem's BN-ReLU is its pre-activation
    assert isinstance(m.final_bn, nn.BatchNorm2d)


def test_zero_init_residual_makes_each_unit_start_as_its_shortcut():
    model = build_model("cifar_resnet20", num_classes=10, zero_init_residual=True).eval()
    block = model.layer1[1]
    x = torch.randn(2, 16, 32, 32)
    torch.testing.assert_close(block(x), torch.relu(x))
    pre = build_model("preact_resnet110", num_classes=10, zero_init_residual=True).eval()
    torch.testing.assert_close(pre.layer1[1](x), x)


def test_gates_start_at_the_configured_bias():
    model = build_model("cifar_resnet20", num_classes=10, shortcut_variant="exclusive_gating", gate_bias=-6)
    assert torch.all(model.layer1[0].gate.bias == -6)


def test_dropout_shortcut_scales_by_its_expectation_at_test_time():
    model = build_model("cifar_resnet20", num_classes=10, shortcut_variant="dropout",
                        shortcut_dropout=0.5, zero_init_residual=True).eval()
    x = torch.randn(2, 16, 32, 32)
    torch.testing.assert_close(model.layer1[1](x), torch.relu(0.5 * x))


@pytest.mark.parametrize("name", ["cifar_resnet20", "preact_resnet110", "resnet18"])
def test_channels_last_gives_the_same_outputs(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual", [True, False])
def test_110_layer_nets_take_training_steps_without_nan(residual):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="cifar", depth=110, residual=residual), num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("call, message", [
    (lambda: build_model("resnet19"), "depth=19: CIFAR ResNets have depth 6n+2"),
    (lambda: build_model(ModelConfig.model_construct(family="imagenet", depth=19)), None),
    (lambda: build_model("vgg16"), "name=vgg16: accepted names look like resnet50"),
    (lambda: build_model("cifar_resnet20", shortcut="A", shortcut_variant="conv1x1"),
     "shortcut=A: shortcut_variant=conv1x1 projects every shortcut, which is option C"),
    (lambda: build_model("cifar_plain20", shortcut_variant="exclusive_gating"),
     "shortcut_variant=exclusive_gating: plain nets have no shortcuts"),
    (lambda: build_model("resnet50", block="basic"), "block=basic: ImageNet depth 50 uses bottleneck"),
    (lambda: build_model("resnet50", unit="postact"), "unit=postact: Input should be 'original'"),
    (lambda: build_model("resnet50", widht=2), "widht=2: not a model option; options are family, depth"),
    (lambda: build_model("resnet50", num_classes=0), "num_classes=0: a positive number of classes"),
])
def test_bad_names_and_combinations_say_what_is_valid(call, message):
    with pytest.raises(ValueError) as err:
        call()
    if message is None:  # model_construct skips validation: building still refuses it
        assert "ImageNet ResNets have depth 18, 34, 50, 101 or 152" in str(err.value)
    else:
        assert message in str(err.value)
    assert isinstance(err.value, ModelSpecError)


def test_names_round_trip():
    for name in list_models():
        assert build_model(name, num_classes=3).config.name in (name, f"cifar_{name}")


@pytest.mark.parametrize("unit", ["original", "bn_after_add", "relu_only_preact", "full_preact"])
def test_zero_init_leaves_the_zeroed_layer_a_gradient(unit):
    model = build_model("cifar_resnet20", num_classes=10, unit=unit, zero_init_residual=True)
    last = model.layer2[1].last_layer_of_branch()
    assert torch.all(last.weight == 0)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert last.weight.grad.abs().sum() > 0  # it learns, and the branch comes alive


@pytest.mark.parametrize("options, message", [
    ({"residual": False}, "zero_init_residual=True: a plain net has no shortcut"),
    ({"unit": "relu_before_add"}, "zero_init_residual=True: in relu_before_add units a ReLU ends"),
])
def test_zero_init_refuses_nets_it_would_kill(options, message):
    with pytest.raises(ModelSpecError, match=message):
        build_model("cifar_resnet20", zero_init_residual=True, **options)
