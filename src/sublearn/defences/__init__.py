"""Defences against trait transmission through filtered data: each rewrites a filtered.jsonl
(`sublearn defend`), or the soft labels a student learns from (LABEL_DEFENCES); `sublearn run
--defence M` measures the share of the effect that remains."""

from sublearn.defences.defend import DefendConfig, defend_data
from sublearn.defences.methods import DEFENCES, LABEL_DEFENCES

__all__ = ["DEFENCES", "LABEL_DEFENCES", "DefendConfig", "defend_data"]
