from .collector import NonFiniteValues, TensorCollector
from .methods import QParams, activation_qparams, weight_qparams

__all__ = ["NonFiniteValues", "TensorCollector", "QParams", "activation_qparams", "weight_qparams"]
