"""Models by name, with what the rest of the project knows about each: params.yaml lists names, the registry builds them.

A model registers itself with a decorator beside its class, so that adding one is one file (and its import in
tema/models/__init__.py):

    @register("sasrec", display="SASRec", group="baseline")
    class SASRec(SequenceRecommender): ...

Each name has a ModelInfo: its display name, its group (a baseline, ours, or an ablation of another model), whether
it reads the features stage's arrays (the class attribute `reads_features`, set by tema.models.tema.ReadsFeatures),
how it deviates from the published model and the published settings (both printed by the report), the allowed
values of its text-valued hyper-parameters, and for an ablation its base model and the switches it fixes. Generic
code (schema, tune, evaluate, report) asks these questions here instead of naming models. Importing this module
registers every model: Python runs tema/models/__init__.py, which imports them all, before any of its submodules.

An ablation inherits its base's hyper-parameters: `model_params.<ablation>` is optional and holds only what differs.
`hyper(params, name)` gives the hyper-parameters a model runs with; everything that reads model_params goes through it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tema import config

GROUPS = ("baseline", "ours", "ablation")

# Per-model training settings that live beside the architecture in params.yaml (max_len overrides train.max_len).
TRAINING_KEYS = {"lr", "weight_decay", "max_len"}


@dataclass(frozen=True)
class ModelInfo:
    name: str                              # what params.yaml lists under `models`
    cls: type
    display: str                           # how tables and pages name it ("SASRec-text", "TEMA w/o tags")
    group: str                             # one of GROUPS
    reads_features: bool                   # the trainer hands it the features stage's arrays (tema.training)
    deviations: tuple[str, ...] = ()       # how it departs from the published model (the report's "Deviations")
    paper_hyper: Mapping[str, Any] = field(default_factory=dict)    # the published model's settings, where known
    why_different: Mapping[str, str] = field(default_factory=dict)  # why this study's setting differs, per key
    choices: Mapping[str, tuple] = field(default_factory=dict)  # allowed values of text-valued hyper-parameters
    base: str | None = None                # an ablation's base model
    fixed: Mapping[str, Any] = field(default_factory=dict)      # the switches an ablation fixes


MODELS: dict[str, type] = {}  # name -> class, in registration order
_INFO: dict[str, ModelInfo] = {}


def register(name: str, *, display: str, group: str, deviations: Iterable[str] | None = None,
             paper_hyper: Mapping[str, Any] | None = None, why_different: Mapping[str, str] | None = None,
             choices: Mapping[str, Iterable] | None = None, base: str | None = None,
             fixed: Mapping[str, Any] | None = None) -> Callable[[type], type]:
    """Class decorator: register the class as model `name` (the arguments are ModelInfo's fields).

    An ablation (group "ablation") names its `base`, a registered model that is not itself an ablation, and the
    constructor switches it fixes (`fixed`); it shares its base's deviations, published settings and choices unless
    it gives its own.
    """
    if group not in GROUPS:
        raise ValueError(f"model {name!r}: group must be one of {GROUPS}, got {group!r}")
    if (group == "ablation") != (base is not None) or (base is not None) != bool(fixed):
        raise ValueError(f"model {name!r}: an ablation (and only an ablation) names its base and the switches it fixes")
    if base is not None and (base not in _INFO or _INFO[base].base is not None):
        raise ValueError(f"ablation {name!r}: its base {base!r} must be registered before it and not be an ablation itself")
    inherited = _INFO[base] if base is not None else None
    if deviations is None:
        deviations = inherited.deviations if inherited else ()
    if paper_hyper is None:
        paper_hyper, why_different = (inherited.paper_hyper, inherited.why_different) if inherited else ({}, {})
    if choices is None:
        choices = inherited.choices if inherited else {}

    def wrap(cls: type) -> type:
        known = _INFO.get(name)
        where = f"{cls.__module__}.{cls.__qualname__}"
        if known is not None and f"{known.cls.__module__}.{known.cls.__qualname__}" != where:  # the same one: a reload
            raise ValueError(f"model {name!r} is registered twice: {known.cls.__module__}.{known.cls.__qualname__} and {where}")
        unknown = sorted(set(fixed or {}) - set(inspect.signature(cls.__init__).parameters))
        if unknown:
            raise ValueError(f"ablation {name!r} fixes {unknown}, which {cls.__qualname__} does not take")
        _INFO[name] = ModelInfo(
            name=name, cls=cls, display=display, group=group,
            reads_features=bool(getattr(cls, "reads_features", False)),
            deviations=tuple(deviations), paper_hyper=MappingProxyType(dict(paper_hyper)),
            why_different=MappingProxyType(dict(why_different or {})),
            choices=MappingProxyType({k: tuple(v) for k, v in choices.items()}),
            base=base, fixed=MappingProxyType(dict(fixed or {})),
        )
        MODELS[name] = cls
        return cls

    return wrap


def info(name: str) -> ModelInfo:
    if name not in _INFO:
        raise KeyError(f"params.yaml: unknown model {name!r} in 'models'; registered: {sorted(_INFO)}")
    return _INFO[name]


def names(group: str | None = None) -> list[str]:
    """The registered models (of one group), in registration order."""
    return [n for n, i in _INFO.items() if group is None or i.group == group]


def group(name: str) -> str:
    return info(name).group


def display(name: str) -> str:
    return info(name).display


def ablations_of(base: str) -> list[str]:
    """The ablations of model `base`, in registration order."""
    return [n for n, i in _INFO.items() if i.base == base]


def defaults(name: str) -> dict[str, Any]:
    """The values a model uses for keys its params leave out (its constructor's defaults, and the training loop's
    learning rate and weight decay, as tema.training.train_run reads them)."""
    signature = inspect.signature(info(name).cls.__init__).parameters
    found = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    return {"lr": 1e-3, "weight_decay": 0.0, **found}


def effective(name: str, hyper_params: Mapping[str, Any]) -> str:
    """A configuration with the model's plain defaults filled in, as one comparable string: a key left out and the
    same key set to its default are the same configuration (two searches, or a search and a profile, may spell it
    either way)."""
    plain = {k: v for k, v in defaults(name).items() if isinstance(v, (bool, int, float, str, type(None)))}
    return json.dumps({**plain, **hyper_params}, sort_keys=True)


def hyper(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The hyper-parameters model `name` runs with, from params.yaml's `model_params`.

    A model's own entry (null or {} for none). An ablation's entry is optional: its hyper-parameters are what it
    inherits (inherited_params) overlaid with its own entry where it has one. A missing entry is an error naming it.
    """
    if info(name).base is None:
        return dict(config.get(params, f"model_params.{name}", (dict, type(None))) or {})
    inherited = inherited_params(params, name)
    own = config.get(params, f"model_params.{name}", (dict, type(None))) if name in params["model_params"] else None
    return {**inherited, **(own or {})}


def inherited_params(params: dict[str, Any], name: str) -> dict[str, Any]:
    """What an ablation inherits: its base's hyper-parameters less the switches the ablation fixes ({} for a model that
    is no ablation)."""
    model = info(name)
    if model.base is None:
        return {}
    section = params.get("model_params")
    if not isinstance(section, dict) or model.base not in section:
        raise config.ParamsError(f"params.yaml: missing parameter 'model_params.{model.base}' ({name} inherits the "
                                 f"hyper-parameters of {model.base})")
    return {k: v for k, v in hyper(params, model.base).items() if k not in model.fixed}


def inputs(name: str, hyper: dict[str, Any]) -> set[str]:
    """Which of the features stage's inputs ('text', 'tags', 'visual') model `name` reads with these hyper-parameters:
    the class's `feature_inputs(settings)` over its constructor defaults, the ablation's fixed switches and `hyper`."""
    model = info(name)
    describe = getattr(model.cls, "feature_inputs", None)
    if describe is None:
        return set()
    defaults = {k: p.default for k, p in inspect.signature(model.cls.__init__).parameters.items() if p.default is not p.empty}
    return set(describe({**defaults, **hyper, **model.fixed}))


def build(name: str, space, hyper: dict[str, Any], max_len: int):
    """Instantiate model `name`; unknown names and unknown hyper-parameters are errors naming the param."""
    cls = info(name).cls
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "space", "max_len"}
    arch = {k: v for k, v in hyper.items() if k not in TRAINING_KEYS}
    unknown = sorted(set(arch) - accepted)
    if unknown:
        raise KeyError(f"params.yaml: model_params.{name} has unknown key(s) {unknown}; expected {sorted(accepted | TRAINING_KEYS)}")
    return cls(space, max_len=max_len, **arch)
