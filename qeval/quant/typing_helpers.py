"""Typed access to what torch and transformers type loosely.

``nn.Module.__getattr__`` is typed ``Tensor | Module``, so ``module.weight``,
``model.config`` and ``block.get_submodule(name)`` (typed ``Module``) say nothing
useful to a type checker.  These helpers narrow once, at the point of access, and
fail with a message naming the module when the model is not what the code assumes
(the adapter table names linears; transformers models carry a config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from transformers import PretrainedConfig


def as_linear(module: object, name: str) -> nn.Linear:
    """``module`` itself, checked to be an ``nn.Linear`` (``name`` says where it came from)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, expected an nn.Linear")
    return module


def linear_at(module: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` at the dotted path ``name`` under ``module``."""
    return as_linear(module.get_submodule(name), name)


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, checked to be a tensor (a parameter or a buffer)."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is {type(value).__name__}, expected a tensor")
    return value


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` (a norm's, an embedding's), as a tensor."""
    return tensor_attr(module, "weight")


def config_of(model: nn.Module) -> PretrainedConfig:
    """``model.config`` of a transformers model."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model).__name__}.config is {type(config).__name__}, expected a transformers config")
    return config


def input_embeddings(model: nn.Module) -> nn.Module:
    """``model.get_input_embeddings()`` (transformers' PreTrainedModel API)."""
    # cast: the method is transformers', found by ordinary lookup; nn.Module's __getattr__
    # types it Tensor | Module (a check would refuse wrappers that forward the method)
    return cast("Callable[[], nn.Module]", model.get_input_embeddings)()


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` (transformers' PreTrainedModel API): the head, or None."""
    # cast: as in input_embeddings
    return cast("Callable[[], nn.Module | None]", model.get_output_embeddings)()
