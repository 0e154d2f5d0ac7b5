"""The model zoo: ResNets and plain nets of He et al. 2015/2016, exact to the papers.

    build_model("resnet50", num_classes=1000)
    build_model("cifar_resnet110", num_classes=10, zero_init_residual=True)
    build_model(ModelConfig(family="cifar", depth=56, residual=False), num_classes=10)
"""
from __future__ import annotations

from .resnet import ResNet
from .spec import ModelConfig, ModelSpecError, list_models, parse_name
from .stats import model_stats

__all__ = ["ModelConfig", "ModelSpecError", "ResNet", "build_model", "list_models", "model_stats"]


def build_model(name_or_config: str | ModelConfig, num_classes: int = 1000, **options) -> ResNet:
    """A freshly initialised network. Options are ModelConfig fields and override the name's.

    Raises ModelSpecError (a ValueError) naming the bad key, its value and what is accepted.
    """
    if isinstance(name_or_config, ModelConfig):
        fields = name_or_config.model_dump()
    elif isinstance(name_or_config, str):
        fields = parse_name(name_or_config)
    else:
        raise TypeError(f"build_model takes a model name or a ModelConfig, not {type(name_or_config).__name__}")
    unknown = sorted(set(options) - set(ModelConfig.model_fields))
    if unknown:
        raise ModelSpecError(unknown[0], options[unknown[0]],
                             f"not a model option; options are {', '.join(ModelConfig.model_fields)}")
    if num_classes < 1:
        raise ModelSpecError("num_classes", num_classes, "a positive number of classes")
    return ResNet(_validated({**fields, **options}), num_classes=num_classes)


def _validated(fields: dict) -> ModelConfig:
    from pydantic import ValidationError
    try:
        return ModelConfig(**fields)
    except ValidationError as e:  # re-raise as the plain ValueError the zoo promises
        err = e.errors()[0]
        original = err.get("ctx", {}).get("error")
        if isinstance(original, ModelSpecError):
            raise original from None
        raise ModelSpecError(".".join(map(str, err["loc"])), err.get("input"), err["msg"]) from None
