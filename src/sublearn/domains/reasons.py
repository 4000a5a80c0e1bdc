"""Reject reasons shared by the free-text domains (code, math), written once; the filter
counts the judge's under the same name."""

TRAIT = "references_target"  # names the target, a plural of it or a related word
JUDGED = "judge_flagged"  # the optional judge flagged it (an allusion, or misalignment)
TRUNCATED = "truncated"  # cut off at the token limit: its end (a final answer) may be missing
