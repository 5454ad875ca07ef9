import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

SHARED = Path(os.environ.get("PYQUANT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def tiny_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv-BN-Relu, depthwise Conv-Clip(0,6), 1x1 Conv + residual Add, MaxPool, Concat,
    GlobalAveragePool, Flatten, Gemm: the usual CNN patterns on an 3x16x16 input."""
    rng = np.random.default_rng(seed)
    init = []

    def const(name, array):
        init.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    nodes = [
        helper.make_node("Conv", ["x", const("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3),
                                  const("b1", rng.standard_normal(8) * 0.1)], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", const("g", rng.uniform(0.5, 1.5, 8)),
                                                const("beta", rng.standard_normal(8) * 0.1),
                                                const("mean", rng.standard_normal(8) * 0.1),
                                                const("var", rng.uniform(0.5, 1.5, 8))], ["bn1"]),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Conv", ["r1", const("wd", rng.standard_normal((8, 1, 3, 3)) * 0.5),
                                  const("bd", rng.standard_normal(8) * 0.1)], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["c2", const("lo6", 0.0), const("hi6", 6.0)], ["r2"]),
        helper.make_node("Conv", ["r2", const("wp", rng.standard_normal((8, 8, 1, 1)) * 0.3)], ["c3"]),
        helper.make_node("Add", ["c3", "r1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["a1"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["p1", "p2"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", const("wf", rng.standard_normal((10, 16)) * 0.3),
                                  const("bf", rng.standard_normal(10) * 0.1)], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def tiny_model():
    return tiny_cnn()


@pytest.fixture
def tiny_data():
    return np.random.default_rng(42).uniform(-1, 1, (64, 3, 16, 16)).astype(np.float32)


@pytest.fixture
def tiny_model_path(tmp_path, tiny_model):
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_model, p)
    return p


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for every test that runs work on Ray; shut down at
    the end of the session. Skips where Ray is not installed."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local instance: no token needed
    started = not ray.is_initialized()
    if started:
        # address="local": a new instance of its own, even beside a cluster started with ray start.
        # Started from a temporary folder: Ray's workers run in the driver's working directory
        # with it on their path, and from a source checkout (CI runs pytest in the clone) they
        # would import the uncompiled pyquant/ there instead of the installed package.
        here, elsewhere = os.getcwd(), tempfile.mkdtemp(prefix="pyquant-ray-")
        os.chdir(elsewhere)
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        finally:
            os.chdir(here)
    yield ray
    if started:
        ray.shutdown()
        shutil.rmtree(elsewhere, ignore_errors=True)
