"""pyquant search: the space, the trials on Ray (local instance) and in-process with the
same results, the resumable experiment folder, constraints, results and the CLI."""
from __future__ import annotations

import csv
import re
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from pyquant import cli
from pyquant.config import CalibrationMethod, PowerOfTwoMethod
from pyquant.datasource import ArraySource
from pyquant.distributed import LocalExecutor, RayExecutor
from pyquant.errors import ConfigError
from pyquant.search import Constraints, FloatComparisonObjective, SearchSpace, UserObjective, run_search
from pyquant.search.journal import JOURNAL_FILE
from pyquant.search.space import valid_dimensions

FOUR = {"dimensions": {"preset": ["XINT8", "U8S8"], "cross_layer_equalization": [False, True]}}


@pytest.fixture
def held_out():
    return np.random.default_rng(7).uniform(-1, 1, (24, 3, 16, 16)).astype(np.float32)


@pytest.fixture
def setup(tiny_model, tiny_data, held_out):
    calib = ArraySource(tiny_data, "x", batch_size=16)
    objective = FloatComparisonObjective(ArraySource(held_out, "x", batch_size=8), "kl")
    return tiny_model, calib, objective


# ---- the space ----------------------------------------------------------------------------

def test_grid_starts_at_the_first_values_and_drops_duplicates_and_invalid_points():
    space = SearchSpace.from_dict({"dimensions": {
        "preset": ["XINT8", "U8S8"], "per_channel": [False, True], "cross_layer_equalization": [False, True],
        "cle.activation_weight": [0.25, 0.0]}})
    trials, dropped = space.trials()
    first = trials[0]
    assert first.config.power_of_two and not first.config.cross_layer_equalization and first.npu_legal
    # XINT8 per-channel is invalid (4 points); CLE options without CLE repeat a config
    # (XINT8 per-tensor, U8S8 per-tensor and per-channel: 3 points)
    assert dropped == {"same configuration as an earlier point": 3, "invalid configuration": 4}
    assert len(trials) == 16 - 7 and len({t.trial_id for t in trials}) == len(trials)
    legal, dropped = space.trials(npu_legal_only=True)
    assert all(t.npu_legal for t in legal) and len(legal) == 3 and dropped["not NPU-legal"] == 6


def test_values_map_onto_the_typed_config():
    space = SearchSpace.from_dict({"dimensions": {
        "calibrate_method": ["NonOverflow", "Percentile"], "percentile": [99.9],
        "fast_finetune": [{"iterations": 7, "algorithm": "AdaQuant"}], "preset": ["U8S8"]}})
    trials, _ = space.trials()
    assert trials[0].config.calibrate_method is PowerOfTwoMethod.NonOverflow
    assert trials[1].config.calibrate_method is CalibrationMethod.Percentile and trials[1].config.percentile == 99.9
    assert trials[0].config.fast_finetune.iterations == 7
    assert trials[0].config.fast_finetune.algorithm.name == "AdaQuant"


def test_unclipped_output_layers_is_a_dimension():
    space = SearchSpace.from_dict({"dimensions": {"preset": ["U8S8"], "per_channel": [True],
                                                  "unclipped_output_layers": [None, 4]}})
    trials, _ = space.trials()
    assert [t.config.unclipped_output_layers for t in trials] == [None, 4]
    assert [t.config.clipped_input_layers for t in trials] == [None, 4]  # U8S8's limit goes with its whole ranges
    assert trials[0].trial_id != trials[1].trial_id
    with pytest.raises(ConfigError, match="unclipped_output_layers must be >= 0"):
        SearchSpace.from_dict({"dimensions": {"unclipped_output_layers": [None, -1]}})
    space = SearchSpace.from_dict({"dimensions": {"preset": ["U8S8"], "clipped_input_layers": [None, 2]}})
    assert [t.config.clipped_input_layers for t in space.trials()[0]] == [None, 2]
    with pytest.raises(ConfigError, match="clipped_input_layers must be >= 0"):
        SearchSpace.from_dict({"dimensions": {"clipped_input_layers": [-1]}})


def test_random_strategy_keeps_the_starting_point_and_is_seeded():
    spec = {"dimensions": {"preset": ["XINT8"], "calibrate_method": ["MinMSE", "NonOverflow"],
                           "cross_layer_equalization": [False, True], "cle.activation_weight": [0.25, 0.0, 0.5]},
            "strategy": "random", "max_trials": 5, "seed": 3}
    a, dropped = SearchSpace.from_dict(spec).trials()
    b, _ = SearchSpace.from_dict(spec).trials()
    grid, _ = SearchSpace.from_dict({**spec, "strategy": "grid", "max_trials": None}).trials()
    assert [t.trial_id for t in a] == [t.trial_id for t in b] and len(a) == 5
    assert a[0].trial_id == grid[0].trial_id and dropped["beyond max_trials"] == len(grid) - 5
    assert [t.index for t in a] == list(range(5))


@pytest.mark.parametrize("spec,message", [
    ({"dimensions": {"calibrate_method": ["MinMSe"]}}, "calibrate_method.*MinMSe"),
    ({"dimensions": {"cle.steps": [0]}}, "CLE steps"),
    ({"dimensions": {"colour": [1]}}, "unknown search dimension.*colour"),
    ({"dimensions": {"preset": "XINT8"}}, "non-empty list"),
    ({"dimensions": {"preset": ["XINT8"]}, "strategy": "bayes"}, "strategy"),
    ({"dimensions": {"preset": ["XINT8"]}, "max_trial": 3}, "unknown search space key"),
    ({"dimensions": {"mixed_precision": [None, {"min_sqnr_db": 30, "max_metric_drop": -1}]}}, "max_metric_drop"),
    ({"dimensions": {"mixed_precision": [{"min_sqnr": 30}]}}, "unknown mixed_precision key"),
])
def test_a_wrong_space_is_refused_with_what_is_wrong(spec, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(spec)


# ---- running ------------------------------------------------------------------------------

def test_a_search_of_four_trials_on_ray_keeps_the_best(ray_local, setup, tmp_path):
    model, calib, objective = setup
    result = run_search(model, calib, SearchSpace.from_dict(FOUR), objective, tmp_path / "exp",
                        output=tmp_path / "best.onnx", executor=RayExecutor(cpus_per_task=1))
    assert result.executor == "ray" and result.ran == 4 and len(result.records) == 4
    scores = [r["score"] for r in result.records]
    assert all(s >= 0 for s in scores) and result.best["score"] == min(scores)
    best = onnx.load(tmp_path / "best.onnx")
    assert best.SerializeToString() == (tmp_path / "exp" / "trials" / f"{result.best['trial_id']}.onnx").read_bytes()
    assert any(n.op_type == "QuantizeLinear" for n in best.graph.node)
    with open(tmp_path / "exp" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[0]["score"]) == scores[0]
    page = (tmp_path / "exp" / "results.html").read_text()
    assert "data:image/png;base64," in page and "kl against cost" in page
    assert "best (*): trial" in result.to_text()


def test_the_same_trials_give_the_same_results_with_and_without_ray(ray_local, setup, tmp_path):
    model, calib, objective = setup
    space = SearchSpace.from_dict(FOUR)
    on_ray = run_search(model, calib, space, objective, tmp_path / "ray", executor=RayExecutor())
    local = run_search(model, calib, space, objective, tmp_path / "local", executor=LocalExecutor(),
                       threads_per_trial=1)
    assert local.executor == "in-process"
    assert [(r["trial_id"], r["score"], r["size_mb"]) for r in local.records] == \
        [(r["trial_id"], r["score"], r["size_mb"]) for r in on_ray.records]
    for r in local.records:
        assert (tmp_path / "ray" / "trials" / f"{r['trial_id']}.onnx").read_bytes() == \
            (tmp_path / "local" / "trials" / f"{r['trial_id']}.onnx").read_bytes()


def test_an_interrupted_search_resumes_where_it_stopped(setup, tmp_path):
    model, calib, objective = setup
    space = SearchSpace.from_dict(FOUR)

    def stop_after_two(done, total, record):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_search(model, calib, space, objective, tmp_path / "exp", progress=stop_after_two)
    journal = tmp_path / "exp" / JOURNAL_FILE
    assert len(journal.read_text().splitlines()) == 2
    with open(journal, "a") as f:  # a crash in the middle of a third line
        f.write('{"trial_id": "abc", "sco')
    resumed = run_search(model, calib, space, objective, tmp_path / "exp")
    assert resumed.ran == 2 and len(resumed.records) == 4
    again = run_search(model, calib, space, objective, tmp_path / "exp")
    assert again.ran == 0 and [r["score"] for r in again.records] == [r["score"] for r in resumed.records]
    fresh = run_search(model, calib, space, objective, tmp_path / "fresh")
    assert [r["score"] for r in fresh.records] == [r["score"] for r in resumed.records]


def test_a_changed_experiment_is_refused(setup, tmp_path, held_out):
    model, calib, objective = setup
    run_search(model, calib, SearchSpace.from_dict({"dimensions": {"preset": ["XINT8"]}}), objective, tmp_path / "e")
    other = FloatComparisonObjective(objective.data, "cosine")
    with pytest.raises(ConfigError, match="different objective"):
        run_search(model, calib, SearchSpace.from_dict({"dimensions": {"preset": ["XINT8"]}}), other, tmp_path / "e")
    with pytest.raises(ConfigError, match="different space"):
        run_search(model, calib, SearchSpace.from_dict({"dimensions": {"preset": ["U8S8"]}}), objective,
                   tmp_path / "e")


def test_constraints_decide_the_best_and_nothing_is_written_without_one(setup, tmp_path):
    model, calib, objective = setup
    space = SearchSpace.from_dict(FOUR)
    legal = run_search(model, calib, space, objective, tmp_path / "a", constraints=Constraints(npu_legal=True))
    assert len(legal.records) == 2 and all(r["npu_legal"] for r in legal.records)
    none = run_search(model, calib, space, objective, tmp_path / "b", output=tmp_path / "best.onnx",
                      constraints=Constraints(max_size_mb=1e-6))
    assert none.best is None and not (tmp_path / "best.onnx").exists()
    assert all("size" in r["violations"][0] for r in none.records)
    assert "no trial met the constraints" in none.to_text()


def test_a_user_objective_is_module_function(setup, tmp_path, monkeypatch):
    model, calib, _ = setup
    (tmp_path / "my_metric.py").write_text(
        "def qdq_pairs(model):\n    return sum(n.op_type == 'QuantizeLinear' for n in model.graph.node)\n")
    monkeypatch.chdir(tmp_path)
    objective = UserObjective("my_metric:qdq_pairs", higher_is_better=False)
    result = run_search(model, calib, SearchSpace.from_dict(FOUR), objective, tmp_path / "exp")
    assert all(r["score"] == int(r["score"]) > 0 for r in result.records)
    assert result.best["score"] == min(r["score"] for r in result.records)
    with pytest.raises(ConfigError, match="cannot import"):
        run_search(model, calib, SearchSpace.from_dict(FOUR), UserObjective("my_metric:nothing"), tmp_path / "x")


# ---- command line ----------------------------------------------------------------------------

def test_cli_search_in_process(tiny_model, tiny_data, held_out, tmp_path, capsys):
    onnx.save(tiny_model, tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", tiny_data)
    np.save(tmp_path / "held.npy", held_out)
    (tmp_path / "space.json").write_text(json.dumps({"dimensions": {"preset": ["XINT8"],
                                                                    "calibrate_method": ["MinMSE", "NonOverflow"]}}))
    args = ["search", "--model_input", str(tmp_path / "m.onnx"), "--calib_data", str(tmp_path / "calib.npy"),
            "--space", str(tmp_path / "space.json"), "--objective", f"agreement:{tmp_path / 'held.npy'}",
            "--experiment", str(tmp_path / "exp"), "--output", str(tmp_path / "best.onnx"), "--no_ray", "--quiet"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "objective agreement" in out and "2 trials (2 run now on in-process" in out
    assert (tmp_path / "best.onnx").exists()
    (tmp_path / "space.json").write_text("{not json")
    assert cli.main(args) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_the_readme_lists_every_search_dimension():
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    section = text[text.index("Dimensions: `preset`"):text.index("The first value of every dimension")]
    listed = set(re.findall(r"`([a-z_]+)`", section))
    direct = {d for d in valid_dimensions() if "." not in d}
    assert listed == direct, (listed ^ direct)
    assert "`cle.OPTION` (CLEOptions)" in section and "`fast_finetune.OPTION`" in section


def test_a_mixed_precision_target_runs_automatic_mixed_precision_in_the_trial(setup, tmp_path):
    """The dimension's target goes to pyquant.analysis.auto_mixed_precision: a demanding
    SQNR target promotes layers to 16-bit activations (int16 zero points in the model),
    the trial without a target has none."""
    model, calib, objective = setup
    space = SearchSpace.from_dict({"dimensions": {"preset": ["XINT8"],
                                                  "mixed_precision": [None, {"min_sqnr_db": 45.0}]}})
    result = run_search(model, calib, space, objective, tmp_path / "exp", executor=LocalExecutor())
    assert result.ran == 2 and not any("error" in r for r in result.records)

    def int16_points(record):
        trial = onnx.load(tmp_path / "exp" / "trials" / f"{record['trial_id']}.onnx")
        return sum(t.data_type == onnx.TensorProto.INT16 for t in trial.graph.initializer
                   if t.name.endswith("_zero_point"))
    plain, promoted = result.records
    assert int16_points(plain) == 0 and int16_points(promoted) > 0
    assert promoted["score"] <= plain["score"]  # KL to float: lower is better
