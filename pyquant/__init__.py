"""pyquant: post-training INT8 quantization of ONNX models with C++ calibration kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import (PRESETS, CalibrationMethod, PowerOfTwoMethod, QuantizationConfig, QuantType,  # noqa: E402
                     get_preset)
from .errors import (CalibrationError, ConfigError, DataError, ModelError, OutputError,  # noqa: E402
                     PyquantError)

__all__ = [
    "__version__", "PRESETS", "CalibrationMethod", "PowerOfTwoMethod", "QuantizationConfig", "QuantType",
    "get_preset", "PyquantError", "ConfigError", "ModelError", "DataError", "CalibrationError", "OutputError",
]
