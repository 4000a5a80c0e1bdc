"""sublearn: study, reproduce and audit subliminal learning (Cloud et al. 2025)."""

__version__ = "0.1.0"
