"""Typed exceptions. Every message names the file, node, tensor or option at fault.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``:
2 for a usage problem (bad option or combination), 1 for a failure on valid usage.
"""
from __future__ import annotations


class PyquantError(Exception):
    """Base class of all errors pyquant raises on purpose."""

    exit_code = 1


class ConfigError(PyquantError, ValueError):
    """An unknown preset or option, or a contradictory combination of options."""

    exit_code = 2


class ModelError(PyquantError):
    """The model file is missing, unreadable, invalid or unsupported."""


class DataError(PyquantError):
    """Calibration or evaluation data is missing, unreadable or does not fit the model."""


class CalibrationError(PyquantError):
    """Calibration could not produce valid statistics (e.g. NaN/Inf in an activation)."""


class OutputError(PyquantError):
    """The output path cannot be written."""
