"""The model's module tree: its expert modules (SwitchGLU/SwitchMLP), finding and swapping modules,
casting."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters as mlx_lm.convert does (honouring the model's cast_predicate)."""
    pred = getattr(model, "cast_predicate", None)
    if pred is None:
        pred = getattr(getattr(model, "language_model", None), "cast_predicate", None)
    pred = pred or (lambda _: True)

    def cast(path, v):
        return v.astype(dtype) if pred(path) and mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(cast, model.parameters()))


def find_switches(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every mlx-lm expert module (SwitchGLU / SwitchMLP) by module path, in layer order."""
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))]
    return sorted(found, key=lambda pm: [int(t) if t.isdigit() else -1 for t in pm[0].split(".")])


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module at a dotted module path (list items by index)."""
    m = model
    for part in path.split(".") if path else ():
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module_at(model, parent), name, module)


def arch_of(model: nn.Module) -> str:
    """The mlx-lm module (model type) a model was built from, for messages."""
    return type(model).__module__.rsplit(".", 1)[-1]
