"""Models by name: params.yaml lists names, the registry builds them from their params section."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

MODELS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        MODELS[name] = cls
        return cls

    return wrap


def build(name: str, space, hyper: dict[str, Any], max_len: int):
    """Instantiate model `name`; unknown names and unknown hyper-parameters are errors naming the param."""
    import tema.models  # noqa: F401  (registers the built-in models)

    if name not in MODELS:
        raise KeyError(f"params.yaml: unknown model {name!r} in 'models'; registered: {sorted(MODELS)}")
    cls = MODELS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "space", "max_len"}
    arch = {k: v for k, v in hyper.items() if k not in TRAINING_KEYS}
    unknown = sorted(set(arch) - accepted)
    if unknown:
        raise KeyError(f"params.yaml: model_params.{name} has unknown key(s) {unknown}; expected {sorted(accepted | TRAINING_KEYS)}")
    return cls(space, max_len=max_len, **arch)


# Per-model training settings that live beside the architecture in params.yaml (max_len overrides train.max_len).
TRAINING_KEYS = {"lr", "weight_decay", "max_len"}
