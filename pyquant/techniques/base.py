"""The seam every technique plugs into (in the spirit of NNCF's algorithms): a technique is
a small object that says what it needs and then applies itself.

    class MyTechnique(Technique):
        name = "my_technique"
        stage = Stage.PARAMETERS

        @classmethod
        def from_config(cls, config):          # None: not enabled by this config
            return cls() if config.my_option else None

        def statistics_needed(self, state):    # collected in the one calibration pass
            return StatisticsRequest(channel_means={...})

        def apply(self, state):                # change state.model / state.table
            ...

and one line in pyquant.techniques.REGISTRY, which is the order they run in. The
pipeline (pyquant.pipeline) does the rest:

    prepare -> GRAPH techniques (float model, a few peeked samples) -> plan
            -> one calibration pass (activation ranges + every technique's request)
            -> parameter table -> PARAMETERS techniques -> QDQ model
"""
from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Any, Callable, ClassVar, Dict, List, Optional

from onnx import ModelProto

from ..calibrate.runner import ProgressCallback, Statistics, StatisticsRequest
from ..config import QuantConfig
from ..graph.plan import QuantPlan, plan_for
from ..qparams import QuantTable
from ..runtime import Feed


class Stage(enum.Enum):
    """GRAPH: rewrites the float model before calibration (the plan and the statistics are
    taken on its result); it may look at a few calibration samples. PARAMETERS: runs after
    calibration, on the statistics and the parameter table."""

    GRAPH = "graph"
    PARAMETERS = "parameters"


LayerCallback = Callable[[Any, int, int], None]  # (a technique's per-layer result, layers done, total)


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """Progress reporting of a run: calibration batches; and for techniques that read the
    data again (fast finetune) their batches and their per-layer results."""

    calibration: Optional[ProgressCallback] = None
    technique_batches: Optional[ProgressCallback] = None
    technique_layers: Optional[LayerCallback] = None


@dataclasses.dataclass
class QuantState:
    """What the techniques read and change during one run."""

    model: ModelProto  # the float model being quantized (techniques change it in place)
    config: QuantConfig
    reader: Any  # the calibration data (get_next(), rewind() when a technique rereads it)
    callbacks: Callbacks = Callbacks()
    samples: List[Feed] = dataclasses.field(default_factory=list)  # peeked batches (GRAPH stage only)
    float_model: Optional[ModelProto] = None  # the model after the GRAPH stage, if a technique asked
    plan: Optional[QuantPlan] = None
    statistics: Optional[Statistics] = None
    table: Optional[QuantTable] = None
    reports: Dict[str, Any] = dataclasses.field(default_factory=dict)  # technique name -> its report
    keep_float: Dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> why it is never quantized

    def replan(self) -> None:
        """Plan again after a change of the graph (e.g. a layer gained a bias input)."""
        self.plan = plan_for(self.model, self.config, self.keep_float)


class Technique(abc.ABC):
    name: ClassVar[str]
    stage: ClassVar[Stage]
    rereads_data: ClassVar[bool] = False  # reads the calibration data again: the reader must rewind()
    needs_float_model: ClassVar[bool] = False  # reads state.float_model

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: QuantConfig) -> Optional["Technique"]:
        """The technique as ``config`` asks for it, or None when it is off."""

    def samples_needed(self) -> int:
        """GRAPH stage: calibration samples to look at before calibration."""
        return 0

    def statistics_needed(self, state: QuantState) -> StatisticsRequest:
        """PARAMETERS stage: what the calibration pass must collect (state.plan is set)."""
        return StatisticsRequest()

    @abc.abstractmethod
    def apply(self, state: QuantState) -> None:
        """Apply the technique to ``state``; a report goes into state.reports[name]."""
