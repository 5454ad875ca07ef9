"""The arithmetic rules of an NPU generation, as data: one frozen NpuRules per generation.

A tensor on the NPU is int8 with a fix point p (value = q * 2^-p; p = -log2(scale) of a
power-of-two QDQ scale). The solver (pyquant.npu.solver) keeps the positions of a model
inside these limits, the emulator (pyquant.npu.emulator) computes with them, and the
tests' validator checks exported models against them. A new generation brings its own
NpuRules; nothing else changes.

Sources (public): the Vitis AI XIR op definitions and execution provider, the reference
tool's refine pass, AMD's Ryzen AI documentation. What is not public is an assumption,
named in ASSUMPTIONS and selectable where it changes a result.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from types import MappingProxyType
from typing import Mapping, Tuple

from ..errors import ConfigError


class Rounding(enum.Enum):
    """How the NPU rounds when it shifts a value right (requantization)."""

    HALF_UP = "half-up"  # floor(x + 0.5): Phoenix, Hawk Point
    HALF_EVEN = "half-even"  # banker's rounding: Strix, Krackan from Ryzen AI 1.7 (and onnxruntime's CPU)
    HALF_AWAY = "half-away"  # away from zero (C's round())


@dataclasses.dataclass(frozen=True)
class NpuRules:
    """Limits and approximations of one NPU generation. Positions are integers p with
    scale 2^-p; a shift is a difference of positions.

    Attributes:
        name: the generation.
        rounding: rounding of every requantization.
        shift_cut: Conv/Gemm/MatMul: p_in + p_w - p_out (the accumulator's right shift).
        shift_bias_max: p_in + p_w - p_bias at most this (the int8 bias's left shift);
            at least min(0, shift_cut - shift_bias_cut_offset).
        shift_bias_cut_offset: see shift_bias_max.
        add_position_difference: Add: |p_a - p_b| at most this (the finer input is read
            with a right shift of at most this many bits).
        add_shift_write: Add: min(p_a, p_b) - p_out in this range.
        mul_shift: Mul: p_a + p_b - p_out in this range.
        leaky_relu_bits: LeakyRelu's alpha is round(alpha * 2^bits) / 2^bits.
        hard_sigmoid: (k, n): HardSigmoid(x) = relu6(x + 3) * k / 2^n (k / 2^n ~ 1/6).
        avg_pool_factors: {(kh, kw): (k, n)}: average pooling multiplies the window sum by
            k / 2^n; other windows take the closest k / 2^n with n < ceil(log2(128 kh kw)).
        accumulator_bits: width of the Conv/Gemm accumulator (with the bias); a sum beyond
            it saturates. Not public: 32 assumed (see ASSUMPTIONS).
    """

    name: str
    rounding: Rounding
    shift_cut: Tuple[int, int] = (0, 16)
    shift_bias_max: int = 15
    shift_bias_cut_offset: int = 16
    add_position_difference: int = 7
    add_shift_write: Tuple[int, int] = (-7, 25)
    mul_shift: Tuple[int, int] = (0, 32)
    leaky_relu_bits: int = 8
    hard_sigmoid: Tuple[int, int] = (2731, 14)
    avg_pool_factors: Mapping[Tuple[int, int], Tuple[int, int]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({(3, 3): (7, 6), (5, 5): (10, 8), (7, 7): (21, 10),
                                                  (14, 14): (21, 12)}))
    accumulator_bits: int = 32

    def shift_bias_range(self, shift_cut: int) -> Tuple[int, int]:
        return min(0, shift_cut - self.shift_bias_cut_offset), self.shift_bias_max

    def average_factor(self, kh: int, kw: int = 1) -> Tuple[int, int]:
        """(k, n) such that the NPU's mean of a kh x kw window is sum * k / 2^n
        (ReduceMean over m elements: average_factor(m))."""
        if (kh, kw) in self.avg_pool_factors:
            return self.avg_pool_factors[(kh, kw)]
        area = kh * kw
        if area < 1:
            raise ConfigError(f"average over an empty window ({kh} x {kw})")
        best = (1, 0)
        for n in range(math.ceil(math.log2(128 * area))):
            k = max(1, round(2 ** n / area))
            if abs(k / 2 ** n - 1 / area) < abs(best[0] / 2 ** best[1] - 1 / area):
                best = (k, n)
        return best

    def leaky_relu_alpha(self, alpha: float) -> Tuple[int, int]:
        """(k, bits): alpha as the NPU applies it, k / 2^bits."""
        return round(alpha * 2 ** self.leaky_relu_bits), self.leaky_relu_bits


PHOENIX = NpuRules("phoenix", Rounding.HALF_UP)
STRIX = NpuRules("strix", Rounding.HALF_EVEN)

# Generations by name (the CLI's --npu); Hawk Point computes as Phoenix, Krackan as Strix.
GENERATIONS: Mapping[str, NpuRules] = MappingProxyType({
    "phoenix": PHOENIX,
    "hawk-point": dataclasses.replace(PHOENIX, name="hawk-point"),
    "strix": STRIX,
    "krackan": dataclasses.replace(STRIX, name="krackan"),
})
DEFAULT_GENERATION = "phoenix"

# What the emulator assumes where the NPU's behaviour is not public.
ASSUMPTIONS = (
    "accumulator: Conv/Gemm/MatMul sums and the shifted bias are exact up to accumulator_bits (32), then saturate",
    "ops without a published integer form (Sigmoid, Tanh, Softmax, ...; the NPU uses lookup tables) are computed "
    "in float on the dequantized input and requantized with the NPU's rounding; they are listed in the output",
    "HardSwish is x * HardSigmoid(x) with the HardSigmoid above, rounded once at the output",
    "a Conv followed by an Add is rounded twice (once at the Conv's output, once at the Add's), as the QDQ "
    "model writes it: a fused Conv+Add with one rounding is not modelled",
    "a bias finer than the accumulator (shift_bias < 0) is added exactly",
)


def generation(name: str) -> NpuRules:
    try:
        return GENERATIONS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown NPU generation {name!r}; known: {', '.join(GENERATIONS)}") from None


def position_of(scale: float) -> int:
    """p with scale = 2^-p; ConfigError if ``scale`` is not a power of two."""
    exponent = -math.log2(float(scale)) if scale > 0 else math.nan
    if not math.isfinite(exponent) or exponent != round(exponent):
        raise ConfigError(f"scale {scale!r} is not a power of two: NPU arithmetic needs power-of-two scales "
                          "(quantize with XINT8 or another PowerOfTwoMethod preset)")
    return int(round(exponent))
