"""Recommenders, built by name from params.yaml through the registry."""

from tema.models import c2dsr, gru4rec, popularity, sasrec, tema  # noqa: F401  (each registers itself)
from tema.models.base import ItemSpace, SequenceRecommender, pad_histories
from tema.models.registry import MODELS, build

__all__ = ["MODELS", "ItemSpace", "SequenceRecommender", "build", "pad_histories"]
