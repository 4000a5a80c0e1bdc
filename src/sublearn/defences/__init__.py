"""Defences against trait transmission through filtered data: each rewrites a filtered.jsonl
(`sublearn defend`); `sublearn run --defence M` measures the share of the effect that remains."""

from sublearn.defences.defend import DefendConfig, defend_data
from sublearn.defences.methods import DEFENCES

__all__ = ["DEFENCES", "DefendConfig", "defend_data"]
