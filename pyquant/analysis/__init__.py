"""Analyses that win back what a preset loses: which layers cost the accuracy
(sensitivity) and the fewest layers to keep at higher precision to meet a target
(automatic mixed precision)."""
from .mixed_precision import MixedPrecisionResult, PrecisionTarget, Promotion, auto_mixed_precision, load_evaluator
from .sensitivity import SensitivityResult, analyze_sensitivity

__all__ = ["MixedPrecisionResult", "PrecisionTarget", "Promotion", "SensitivityResult", "analyze_sensitivity",
           "auto_mixed_precision", "load_evaluator"]
