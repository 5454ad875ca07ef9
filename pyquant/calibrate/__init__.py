from ..qparams import QParams
from .collector import NonFiniteValues, TensorCollector
from .methods import activation_qparams, weight_qparams

__all__ = ["QParams", "NonFiniteValues", "TensorCollector", "activation_qparams", "weight_qparams"]
