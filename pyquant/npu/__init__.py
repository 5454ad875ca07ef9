"""The NPU target: its arithmetic rules as data (rules), the joint choice of fix-point
positions under them (solver, positions), and an emulator of its integer arithmetic on
onnxruntime (emulator)."""
from .emulator import Emulation, emulate
from .rules import ASSUMPTIONS, DEFAULT_GENERATION, GENERATIONS, NpuRules, Rounding, generation

__all__ = ["emulate", "Emulation", "NpuRules", "Rounding", "GENERATIONS", "DEFAULT_GENERATION", "ASSUMPTIONS",
           "generation"]
