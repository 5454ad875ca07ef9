"""The package's shape: imports point down (no cycles, no function-local imports of the
package to dodge one, no private names borrowed across modules, config a leaf), and a
technique joins the pipeline by one class and one registry line."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Optional, Set

import numpy as np
import pytest

import pyquant
from pyquant import techniques
from pyquant.calibrate.runner import StatisticsRequest
from pyquant.config import get_preset
from pyquant.pipeline import quantize_model
from pyquant.techniques.base import QuantState, Stage, Technique

PACKAGE = Path(pyquant.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    if node.level == 0:
        return node.module if node.module and node.module.split(".")[0] == "pyquant" else None
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def parsed_modules() -> Dict[str, tuple]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[module_name(path)] = (path, ast.parse(path.read_text()), path.name == "__init__.py")
    return out


def top_level_imports(name: str, tree: ast.Module, is_package: bool, known: Set[str]) -> Set[str]:
    """pyquant modules imported at module level (outside functions and TYPE_CHECKING)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            target = resolve(name, is_package, node)
            if target is None:
                continue
            for alias in node.names:  # "from . import kernels" imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def test_no_import_cycles_and_config_is_a_leaf():
    modules = parsed_modules()
    known = set(modules)
    graph = {m: top_level_imports(m, tree, pkg, known) - {m} for m, (_, tree, pkg) in modules.items()}
    assert graph["pyquant.config"] <= {"pyquant.errors"}, graph["pyquant.config"]
    # a package's __init__ re-exports its children: drop child -> parent edges it implies
    state: Dict[str, int] = {}

    def visit(m: str, stack: list) -> None:
        state[m] = 1
        for dep in graph.get(m, ()):
            if dep.startswith(m + ".") or m.startswith(dep + ".") and modules.get(dep, (0, 0, False))[2]:
                continue  # parent package <-> its own submodule
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack + [m, dep])}")
            if dep not in state:
                visit(dep, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_function_local_package_imports_and_no_borrowed_private_names():
    problems = []
    for name, (path, tree, is_package) in parsed_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and resolve(name, is_package, inner):
                        problems.append(f"{path.name}:{inner.lineno} imports pyquant inside {node.name}()")
            if isinstance(node, ast.ImportFrom) and resolve(name, is_package, node):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.endswith("__") and alias.name != "_kernels":
                        problems.append(f"{path.name}:{node.lineno} imports private {alias.name}")
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                problems.append(f"{path.name}:{node.lineno} imports under TYPE_CHECKING (a cycle in disguise)")
    assert not problems, "\n".join(problems)


# ---- the seam: a newcomer's technique ---------------------------------------------------

class CountingReader:
    def __init__(self, data: np.ndarray, batch: int = 8) -> None:
        self.data, self.batch, self.pos, self.reads = data, batch, 0, 0

    def get_next(self):
        if self.pos >= len(self.data):
            return None
        self.reads += 1
        self.pos += self.batch
        return {"x": self.data[self.pos - self.batch:self.pos]}

    def rewind(self) -> None:
        self.pos = 0


class LooksAtSamples(Technique):
    """GRAPH stage: asks for 16 samples before calibration and records what it saw."""

    name = "looks_at_samples"
    stage = Stage.GRAPH

    @classmethod
    def from_config(cls, config):
        return cls()

    def samples_needed(self) -> int:
        return 16

    def apply(self, state: QuantState) -> None:
        state.reports[self.name] = sum(len(feed["x"]) for feed in state.samples)


class InputMeans(Technique):
    """PARAMETERS stage: asks the calibration pass for the input's channel means and
    halves the input's scale in the table (a visible change in the written model)."""

    name = "input_means"
    stage = Stage.PARAMETERS

    @classmethod
    def from_config(cls, config):
        return cls()

    def statistics_needed(self, state: QuantState) -> StatisticsRequest:
        return StatisticsRequest({"x": 1})

    def apply(self, state: QuantState) -> None:
        state.reports[self.name] = state.statistics.channel_means["x"].mean
        qp = state.table.activations["x"]
        state.table.activations["x"] = type(qp)(qp.scale / 2, qp.zero_point, qp.axis)


def test_a_new_technique_is_one_class_and_one_registry_line(monkeypatch, tiny_model, tiny_data):
    config = get_preset("U8S8")
    plain = quantize_model(tiny_model, CountingReader(tiny_data), config).model
    monkeypatch.setattr(techniques, "REGISTRY", [LooksAtSamples, *techniques.REGISTRY, InputMeans])
    reader = CountingReader(tiny_data)
    result = quantize_model(tiny_model, reader, config)
    assert result.reports["looks_at_samples"] == 16
    np.testing.assert_allclose(result.reports["input_means"], tiny_data.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert reader.reads == len(tiny_data) // 8  # one pass: the peeked batches were replayed, not read again
    scale = {i.name: i for i in result.model.graph.initializer}["x_QuantizeLinear_Output_scale"]
    plain_scale = {i.name: i for i in plain.graph.initializer}["x_QuantizeLinear_Output_scale"]
    assert np.frombuffer(scale.raw_data, np.float32)[0] == np.frombuffer(plain_scale.raw_data, np.float32)[0] / 2
