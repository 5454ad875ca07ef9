"""What the README states about the code, checked against the code."""
import re
from pathlib import Path

from pyquant.calibrate.methods import POW2_SEARCH_STEPS
from pyquant.graph.plan import OP_RULES
from pyquant.npu.rules import PHOENIX, STRIX, Rounding

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_text() -> str:
    return " ".join(README.read_text().split())  # paragraphs wrap anywhere: one space between words


def presets_row(name: str) -> str:
    return next(line for line in README.read_text().splitlines() if line.startswith(f"| {name} |"))


def test_xint8_minmse_search_count_is_the_codes():
    # methods._pow2_candidates: exponents k_no - POW2_SEARCH_STEPS .. k_no, k_no the smallest
    # that does not clip (tests/test_calibrate.py checks the exponents actually searched).
    found = re.search(r"among (\d+) exponents: the smallest non-overflowing one and the (\d+) below it",
                      presets_row("XINT8"))
    assert found, presets_row("XINT8")
    assert (int(found[1]), int(found[2])) == (POW2_SEARCH_STEPS + 1, POW2_SEARCH_STEPS)


def test_listed_data_movement_ops_keep_their_input_scale():
    found = re.search(r"data-movement ops \(([^)]*)\) keep their input scale", readme_text())
    assert found
    listed = [op.strip() for op in found[1].split(",")]
    assert "Split" in listed and len(listed) > 5
    assert [op for op in listed if not OP_RULES[op].same_scale] == []


def test_listed_npu_rules_are_the_codes():
    assert "Concat inputs and output share one scale; AveragePool and GlobalAveragePool keep input scale = " \
           "output scale" in readme_text()
    assert OP_RULES["Concat"].npu_concat
    assert OP_RULES["AveragePool"].npu_same_scale and OP_RULES["GlobalAveragePool"].npu_same_scale


def test_npu_rule_table_is_the_codes():
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Conv/Gemm/MatMul shift_cut"))
    assert f"[{PHOENIX.shift_cut[0]}, {PHOENIX.shift_cut[1]}]" in row
    row = next(line for line in text.splitlines() if line.startswith("| Add: p_a - p_b"))
    assert f"[-{PHOENIX.add_position_difference}, {PHOENIX.add_position_difference}]" in row
    row = next(line for line in text.splitlines() if line.startswith("| Mul:"))
    assert f"[{PHOENIX.mul_shift[0]}, {PHOENIX.mul_shift[1]}]" in row
    row = next(line for line in text.splitlines() if line.startswith("| average pooling"))
    assert all(f"{kh}x{kw} {k}/{2 ** n}" in row for (kh, kw), (k, n) in PHOENIX.avg_pool_factors.items())
    assert PHOENIX.rounding is Rounding.HALF_UP and STRIX.rounding is Rounding.HALF_EVEN
