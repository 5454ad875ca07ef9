"""Accuracy-driven search over quantization configurations (``pyquant search``)."""
from .objective import FloatComparisonObjective, Top1Objective, UserObjective
from .results import SearchResult
from .runner import Constraints, run_search
from .space import SearchSpace, Trial

__all__ = ["Constraints", "FloatComparisonObjective", "SearchResult", "SearchSpace", "Top1Objective", "Trial",
           "UserObjective", "run_search"]
