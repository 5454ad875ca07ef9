"""A declared search space: which configurations the search may try, in which order.

A space is JSON (``pyquant search --space space.json``) or the same dict in Python:

    {"dimensions": {"preset": ["XINT8"],
                    "calibrate_method": ["MinMSE", "NonOverflow"],
                    "cross_layer_equalization": [false, true],
                    "cle.activation_weight": [0.25, 0.0],
                    "fast_finetune": [null, {"iterations": 300}],
                    "mixed_precision": [null]},
     "strategy": "grid", "max_trials": 12, "seed": 0}

Each dimension lists its values, the first being the starting point. ``preset`` (the base
QuantConfig, default XINT8) is applied first; a QuantConfig field (per_channel, percentile,
calibrate_method by member name, ...) replaces that field; ``cle.NAME`` and
``fast_finetune.NAME`` replace one option of CLEOptions / FastFinetuneOptions
(``fast_finetune`` itself: null for none, true for the defaults, or a dict of options);
``mixed_precision`` is a target for automatic mixed precision (pyquant.analysis, see
``mixed_precision_target``). Candidates are the grid's points in order (the last dimension
varies fastest), without points that give the same configuration as an earlier one (e.g.
CLE options with CLE off) or an invalid one (per-channel power-of-two scales); "grid" takes
the first ``max_trials``, "random" the starting point and then a seeded shuffle of the rest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..analysis.mixed_precision import PrecisionTarget
from ..config import (CalibrationMethod, CLEOptions, FastFinetuneOptions, FinetuneAlgorithm, PowerOfTwoMethod,
                      QuantConfig, QuantType, get_preset)
from ..errors import ConfigError

STRATEGIES = ("grid", "random")
# QuantConfig fields a space may vary directly (the others are run settings or model-specific).
CONFIG_FIELDS = ("activation_type", "weight_type", "calibrate_method", "activation_symmetric", "per_channel", "enable_npu_cnn",
                 "quantize_region_outputs", "percentile", "num_bins", "weight_scale_mse", "bias_correction",
                 "empirical_bias_correction", "cross_layer_equalization", "unclipped_output_layers",
                 "clipped_input_layers")
CLE_FIELDS = tuple(f.name for f in dataclasses.fields(CLEOptions))
FINETUNE_FIELDS = tuple(f.name for f in dataclasses.fields(FastFinetuneOptions))
# PrecisionTarget's fields that a JSON space can give (the evaluator is the search's objective).
MIXED_PRECISION_FIELDS = ("min_sqnr_db", "min_cosine", "max_metric_drop", "allow_float")


def valid_dimensions() -> List[str]:
    return (["preset", "fast_finetune", "mixed_precision"] + list(CONFIG_FIELDS)
            + [f"cle.{f}" for f in CLE_FIELDS] + [f"fast_finetune.{f}" for f in FINETUNE_FIELDS])


@dataclasses.dataclass(frozen=True)
class Trial:
    """One point of the space: its parameters as declared, the QuantConfig they give and
    the mixed precision target (None: none)."""

    index: int
    params: Mapping[str, Any]
    config: QuantConfig
    mixed_precision: Optional[Mapping[str, Any]] = None

    @property
    def trial_id(self) -> str:
        """Stable across runs: a hash of the configuration (and target), not of the order."""
        text = repr(self.config) + json.dumps(self.mixed_precision, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def npu_legal(self) -> bool:
        """What an NPU (XINT8 rules) runs: power-of-two scales, NPU CNN rules, 8-bit
        activations, per-tensor int8 weights, no float layers."""
        c = self.config
        eight_bit = all(t.bits == 8 for t in (c.activation_type, *c.tensor_types.values()))
        float_layers = bool(self.mixed_precision and self.mixed_precision.get("allow_float"))
        return (c.power_of_two and c.enable_npu_cnn and eight_bit and c.weight_type is QuantType.QInt8
                and not c.per_channel and not float_layers)

    def describe(self) -> str:
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in self.params.items())


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    dimensions: Mapping[str, Tuple[Any, ...]]
    strategy: str = "grid"
    max_trials: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dimensions, Mapping) or not self.dimensions:
            raise ConfigError("the search space needs at least one dimension")
        unknown = sorted(set(self.dimensions) - set(valid_dimensions()))
        if unknown:
            raise ConfigError(f"unknown search dimension(s) {', '.join(unknown)}; valid: {', '.join(valid_dimensions())}")
        dims = {}
        for name, values in self.dimensions.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ConfigError(f"search dimension {name!r} needs a non-empty list of values, got {values!r}")
            dims[name] = tuple(values)
        object.__setattr__(self, "dimensions", dims)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"search strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.max_trials is not None and (isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int)
                                            or self.max_trials < 1):
            raise ConfigError(f"max_trials must be a positive integer, got {self.max_trials!r}")
        for target in dims.get("mixed_precision", ()):
            mixed_precision_target(target)
        # A value that is invalid on every preset is a mistake in the space (a misspelt
        # method), not a combination to skip: say so instead of dropping its points.
        presets = dims.get("preset", ("XINT8",))
        for name, values in dims.items():
            for value in values:
                errors = []
                for preset in presets:
                    try:
                        config_for({"preset": preset, name: value} if name != "preset" else {"preset": value})
                    except ConfigError as e:
                        errors.append(str(e))
                if len(errors) == len(presets):
                    raise ConfigError(f"search dimension {name!r} value {value!r}: {errors[0]}")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "SearchSpace":
        if not isinstance(spec, Mapping):
            raise ConfigError(f"a search space is a JSON object, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"dimensions", "strategy", "max_trials", "seed"})
        if unknown:
            raise ConfigError(f"unknown search space key(s) {', '.join(unknown)}; valid: dimensions, strategy, "
                              "max_trials, seed")
        return cls(spec.get("dimensions", {}), spec.get("strategy", "grid"), spec.get("max_trials"),
                   spec.get("seed", 0))

    @classmethod
    def from_json_file(cls, path) -> "SearchSpace":
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read search space {path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"search space {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(spec)
        except ConfigError as e:
            raise ConfigError(f"search space {path}: {e}") from None

    def as_dict(self) -> Dict[str, Any]:
        return {"dimensions": {k: list(v) for k, v in self.dimensions.items()}, "strategy": self.strategy,
                "max_trials": self.max_trials, "seed": self.seed}

    def candidates(self) -> Tuple[List[Trial], Dict[str, int]]:
        """Every distinct valid point in grid order, and how many points were dropped and why."""
        names = list(self.dimensions)
        seen, trials = set(), []
        dropped = {"same configuration as an earlier point": 0, "invalid configuration": 0}
        for values in itertools.product(*(self.dimensions[n] for n in names)):
            params = dict(zip(names, values))
            try:
                config, target = config_for(params)
            except ConfigError:
                dropped["invalid configuration"] += 1
                continue
            trial = Trial(len(trials), params, config, target)
            if trial.trial_id in seen:
                dropped["same configuration as an earlier point"] += 1
                continue
            seen.add(trial.trial_id)
            trials.append(trial)
        return trials, dropped

    def trials(self, npu_legal_only: bool = False) -> Tuple[List[Trial], Dict[str, int]]:
        """The trials to run, in order: the candidates (NPU-legal ones only if asked),
        ordered by the strategy and cut to max_trials."""
        trials, dropped = self.candidates()
        if npu_legal_only:
            dropped["not NPU-legal"] = sum(not t.npu_legal for t in trials)
            trials = [t for t in trials if t.npu_legal]
        if self.strategy == "random" and len(trials) > 1:
            rest = trials[1:]
            random.Random(self.seed).shuffle(rest)
            trials = trials[:1] + rest
        if self.max_trials is not None and len(trials) > self.max_trials:
            dropped["beyond max_trials"] = len(trials) - self.max_trials
            trials = trials[:self.max_trials]
        return [dataclasses.replace(t, index=i) for i, t in enumerate(trials)], dropped


def config_for(params: Mapping[str, Any]) -> Tuple[QuantConfig, Optional[Dict[str, Any]]]:
    """The QuantConfig and mixed precision target of one point; ConfigError if invalid."""
    config = get_preset(params.get("preset", "XINT8"))
    changes: Dict[str, Any] = {}
    for name in CONFIG_FIELDS:
        if name in params:
            changes[name] = _field_value(name, params[name])
    if "unclipped_output_layers" in changes and changes["unclipped_output_layers"] is None:
        changes.setdefault("clipped_input_layers", None)  # nothing left for the input-side limit to limit
    if "fast_finetune" in params:
        changes["fast_finetune"] = _finetune_options(params["fast_finetune"])
    cle = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("cle.")}
    if cle:
        changes["cle"] = _replace(config.cle, cle, "cle")
    finetune = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("fast_finetune.")}
    config = dataclasses.replace(config, **changes)
    if cle and not config.cross_layer_equalization:  # CLE options only act with CLE (techniques.cle)
        config = dataclasses.replace(config, cle=get_preset(params.get("preset", "XINT8")).cle)
    if finetune and config.fast_finetune is not None:  # without fast finetune its options change nothing
        config = dataclasses.replace(config, fast_finetune=_replace(config.fast_finetune, finetune, "fast_finetune"))
    target = params.get("mixed_precision")
    return config, (None if target is None else mixed_precision_target(target))


def mixed_precision_target(target: Any) -> Optional[Dict[str, Any]]:
    """A mixed precision dimension's value, checked: None, or the keyword arguments of
    pyquant.analysis.mixed_precision.PrecisionTarget that a JSON space can give (a trial
    with one runs auto_mixed_precision; max_metric_drop is measured with the search's
    objective)."""
    if target is None:
        return None
    if not isinstance(target, Mapping) or not target:
        raise ConfigError(f"a mixed_precision value is null or an object with {', '.join(MIXED_PRECISION_FIELDS)}; "
                          f"got {target!r}")
    unknown = sorted(set(target) - set(MIXED_PRECISION_FIELDS))
    if unknown:
        raise ConfigError(f"unknown mixed_precision key(s) {', '.join(unknown)}; valid: {', '.join(MIXED_PRECISION_FIELDS)}")
    checked = dict(target)
    # PrecisionTarget checks the values; the objective stands in for the evaluator here
    PrecisionTarget(**checked, evaluator=(lambda model: 0.0) if checked.get("max_metric_drop") is not None else None)
    return checked


def _field_value(name: str, value: Any) -> Any:
    if name == "calibrate_method":
        for enum_type in (PowerOfTwoMethod, CalibrationMethod):
            if isinstance(value, str) and value in enum_type.__members__:
                return enum_type[value]
        raise ConfigError(f"calibrate_method {value!r} is not one of "
                          f"{', '.join([*PowerOfTwoMethod.__members__, *CalibrationMethod.__members__])}")
    if name in ("activation_type", "weight_type"):
        if isinstance(value, str) and value in QuantType.__members__:
            return QuantType[value]
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(QuantType.__members__)}")
    return value


def _finetune_options(value: Any) -> Optional[FastFinetuneOptions]:
    if value is None or value is False:
        return None
    if value is True:
        return FastFinetuneOptions()
    if isinstance(value, Mapping):
        return _replace(FastFinetuneOptions(), value, "fast_finetune")
    raise ConfigError(f"fast_finetune is null, true or an object of options, got {value!r}")


def _replace(options, values: Mapping[str, Any], what: str):
    fields = {f.name for f in dataclasses.fields(options)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    converted = dict(values)
    if "algorithm" in converted and isinstance(converted["algorithm"], str):
        try:
            converted["algorithm"] = FinetuneAlgorithm[converted["algorithm"]]
        except KeyError:
            raise ConfigError(f"fast_finetune algorithm {converted['algorithm']!r} is not one of "
                              f"{', '.join(FinetuneAlgorithm.__members__)}") from None
    if "beta_range" in converted and isinstance(converted["beta_range"], list):
        converted["beta_range"] = tuple(converted["beta_range"])
    return dataclasses.replace(options, **converted)
