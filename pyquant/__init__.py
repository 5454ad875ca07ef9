"""pyquant: post-training INT8 quantization of ONNX models with C++ calibration kernels.

Entry points: ``pyquant.quantize`` / ``pyquant.evaluate`` (pyquant.api), the typed
``QuantConfig`` and presets (pyquant.config), and the AMD Quark-compatible
``QuantizationConfig`` / ``Config`` / ``ModelQuantizer`` / ``get_default_config``
(pyquant.compat).
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import evaluate, quantize  # noqa: E402
from .compat import Config, ModelQuantizer, QuantizationConfig, get_default_config  # noqa: E402
from .config import PRESETS, CalibrationMethod, PowerOfTwoMethod, QuantConfig, QuantType, get_preset  # noqa: E402
from .errors import (CalibrationError, ConfigError, DataError, ModelError, OutputError,  # noqa: E402
                     PyquantError)

__all__ = [
    "__version__", "quantize", "evaluate", "Config", "ModelQuantizer", "QuantizationConfig", "get_default_config",
    "PRESETS", "CalibrationMethod", "PowerOfTwoMethod", "QuantConfig", "QuantType", "get_preset",
    "PyquantError", "ConfigError", "ModelError", "DataError", "CalibrationError", "OutputError",
]
