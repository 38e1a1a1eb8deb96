"""Registry-registered conditioners: name them in YAML by ``class_path`` (short names work too)."""

from conditioners.base import Conditioner, ConditionerSpec, Conditioning
from conditioners.identity import IdentityConditioner
from conditioners.multi_reference import MultiReferenceConditioner
from conditioners.reader import ReaderConditioner
from conditioners.relational import RelationalConditioner

__all__ = [
    "Conditioner",
    "ConditionerSpec",
    "Conditioning",
    "IdentityConditioner",
    "MultiReferenceConditioner",
    "ReaderConditioner",
    "RelationalConditioner",
]
