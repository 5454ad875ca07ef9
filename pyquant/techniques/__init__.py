"""Accuracy techniques, one module each. Each is a Technique (pyquant.techniques.base):
it says what it needs (samples to look at, statistics from the calibration pass, a
second read of the data), then applies itself to the model and the parameter table.

REGISTRY is the order they run in; a new technique is one module and one line here.
"""
from typing import List, Type

from ..config import QuantConfig
from .base import Callbacks, QuantState, Stage, Technique
from .bias_absorption import HighBiasAbsorption
from .bias_correction import BiasCorrection
from .cle import CrossLayerEqualization
from .empirical_bias_correction import EmpiricalBiasCorrection
from .fast_finetune.finetune import FastFinetune
from .npu_positions import NpuBiasPositions, NpuPositions

REGISTRY: List[Type[Technique]] = [
    CrossLayerEqualization,  # GRAPH: equalize weight ranges of consecutive layers
    HighBiasAbsorption,  # GRAPH: on CLE's pairs
    NpuPositions,  # PARAMETERS: NPU shift limits, jointly over the graph, before anything uses the scales
    BiasCorrection,  # PARAMETERS: biases absorb the mean error of weight rounding
    FastFinetune,  # PARAMETERS: learned rounding, with the corrected biases of the other layers
    EmpiricalBiasCorrection,  # PARAMETERS: biases absorb the measured mean shift of the QDQ model, once weights are final
    NpuBiasPositions,  # PARAMETERS: int8 bias positions, once the biases are final
]


def techniques_for(config: QuantConfig) -> List[Technique]:
    """The techniques ``config`` enables, in REGISTRY order."""
    return [t for cls in REGISTRY if (t := cls.from_config(config)) is not None]


__all__ = ["REGISTRY", "techniques_for", "Technique", "Stage", "QuantState", "Callbacks"]
