"""ModelSpeedup: calibration config -> precision-annotated ONNX -> backend engine -> inference.

    engine = ModelSpeedup(model, (32, 1, 28, 28), config=calibration_config)
    engine.compress()
    output, latency_s = engine.inference(images)
    engine.precision_report()   # [{'kind': 'layer', 'layer': 'conv1', 'requested': 'int8', 'actual': 'int8', ...}, ...]

The model's inputs are given either as ``input_shape`` (float32 inputs; the batch dimension
included, NNI convention; a list of shapes for several inputs) or as ``dummy_input`` (an
example batch: a tensor, a tuple of tensors, or a dict of keyword tensors, of any dtype: token
ids and attention masks stay integers). The batch axis is dynamic and ``inference`` accepts
any batch size in the same structure, running chunks of at most ``batchsize``; it returns the
model's own output structure (a tensor, a tuple, a dict or a ``ModelOutput``). The user's model
is never modified (a wrapped model is unwrapped on a copy).

``config`` is a calibration config (dict or JSON path from ``quantizer.export_model``). Entries
that give only bit widths (no ranges) are calibrated from ``calib_data_loader`` with the
:class:`~mixq.quantizers.ObserverQuantizer` under the backend's placement. ``extra_layer_bits``
sets the precision of Conv/Linear layers the config does not mention: 32 (fp32, default), 16
(fp16) or 8 (int8, calibrated from ``calib_data_loader``: the backend's placement decides which
activations are quantized).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..atomic_io import atomic_write
from ..compressor.calibration import TENSORS_KEY, CalibrationConfig, load_calibration_config
from ..compressor.model_io import ModelInputs
from ..compressor.wrapper import unwrapped_copy
from ..placement.module_map import module_calls
from ..placement.onnx_export import DEFAULT_EXPORTER, check_exporter, conv_bn_pairs, export_onnx
from ..placement.op_rules import rules_for
from ..version import __version__
from .backends import get_backend, resolve_backend_name
from .backends.base import Backend, BuildOptions, Engine, EngineFormatError
from .calibration_check import check_calibration
from .config_resolution import ConfigResolver, locate_grids
from .engine_file import read_engine_file, write_engine_file
from .engine_io import EngineIO
from .engine_load import load_engine
from .onnx_qdq import annotate
from .precision_plan import PrecisionPlan, build_plan
from .precision_report import build_report
from .threads import resolve_threads
from .weight_codes import choose_folds

logger = logging.getLogger(__name__)

Shape = Tuple[int, ...]
EXTRA_LAYER_BITS = (8, 16, 32)


def _normalize_shapes(input_shape: Any) -> List[Shape]:
    def valid(shape: Any) -> bool:
        return isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1 and all(
            isinstance(d, int) and d > 0 for d in shape)

    if valid(input_shape):
        return [tuple(input_shape)]
    if isinstance(input_shape, (tuple, list)) and input_shape and all(valid(s) for s in input_shape):
        return [tuple(s) for s in input_shape]
    raise ValueError(f"input_shape must be a shape with the batch dimension, e.g. (32, 1, 28, 28), or a list of "
                     f"such shapes for several inputs; got {input_shape!r}")


class ModelSpeedup:
    """Build and run a mixed-precision inference engine from a calibration config.

    Args:
        model: the float model, or one wrapped by a quantizer (it is copied, never modified).
        input_shape: shape with the batch dimension, or a list of shapes for several float32 inputs.
        dummy_input: instead of ``input_shape``, an example batch (tensor, tuple or dict of tensors
            of any dtype); ``inference`` then takes the same structure.
        config: calibration config (dict or JSON path); None quantizes nothing but extra layers.
        backend: 'onnxruntime' (default), 'tensorrt' or 'auto'.
        batchsize: largest batch one engine run takes (default: ``input_shape[0]``); bigger
            inputs are run in chunks of it.
        onnx_path: where to save the precision-annotated ONNX model, if wanted.
        extra_layer_bits: precision of Conv/Linear layers absent from ``config``: 32, 16 or 8.
        calib_data_loader: batches (tensors or (inputs, labels)) for ranges the config lacks.
        calib_batches: how many of its batches to use (default: all).
        exporter: 'torchscript' (default) or 'dynamo' (see :mod:`mixq.placement.onnx_export`).
        num_threads: CPU threads of the engine (default: the cores this process may use).
        dynamic: with ``extra_layer_bits=8``, Linear layers quantize their activations at run
            time (uint8 per tensor, ONNX Runtime's dynamic integer kernels): no calibration data.
    """

    default_backend = "onnxruntime"
    required_backend: Optional[str] = None  # what load_quantized_model accepts (None: any)

    def __init__(self, model: nn.Module, input_shape: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
                 config: Union[CalibrationConfig, str, None] = None, backend: Optional[str] = None,
                 batchsize: Optional[int] = None, onnx_path: Optional[str] = None, extra_layer_bits: int = 32,
                 calib_data_loader: Optional[Iterable[Any]] = None, calib_batches: Optional[int] = None,
                 exporter: str = DEFAULT_EXPORTER, num_threads: Optional[int] = None,
                 dummy_input: Any = None, dynamic: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if extra_layer_bits not in EXTRA_LAYER_BITS:
            raise ValueError(f"extra_layer_bits must be one of {EXTRA_LAYER_BITS}, got {extra_layer_bits!r}")
        if (input_shape is None) == (dummy_input is None):
            raise ValueError("give the model's inputs as input_shape=(batch, ...) for float32 inputs, or as "
                             "dummy_input= an example batch (a tensor, a tuple or a dict of tensors), not both")
        if dynamic and extra_layer_bits != 8:
            raise ValueError("dynamic=True quantizes the Linear layers the config leaves out at run time: it needs "
                             "extra_layer_bits=8")
        self.model = model
        self.dynamic = dynamic
        if dummy_input is not None:
            self.dummy_input: Optional[ModelInputs] = ModelInputs.of(dummy_input, model).map(lambda t: t.detach().cpu())
            self.io = EngineIO.from_example(self.dummy_input)
            default_batch = self.dummy_input.tensors()[0].shape[0]
        else:
            self.dummy_input = None
            shapes = _normalize_shapes(input_shape)
            self.io = EngineIO.from_shapes(shapes)
            default_batch = shapes[0][0]
        self.batchsize = int(batchsize if batchsize is not None else default_batch)
        if self.batchsize < 1:
            raise ValueError(f"batchsize must be >= 1, got {batchsize}")
        if config is not None and not isinstance(config, (str, os.PathLike, dict)):
            kind = "a config list" if isinstance(config, list) else type(config).__name__
            raise TypeError(f"config= takes a calibration config (the dict quantizer.export_model returns, or its JSON "
                            f"path), got {kind}: calibrate the config list with a quantizer first (ObserverQuantizer or "
                            "QAT_Quantizer, then export_model), or pass config=None with extra_layer_bits=8 and "
                            "calib_data_loader=")
        self.config = load_calibration_config(config) if isinstance(config, (str, os.PathLike)) else config
        self.backend_name = resolve_backend_name(backend or self.default_backend)
        self.onnx_path = onnx_path
        self.extra_layer_bits = extra_layer_bits
        self.calib_data_loader = calib_data_loader
        self.calib_batches = calib_batches
        check_exporter(exporter)  # an unknown exporter or a missing onnxscript fails here, not after calibration
        self.exporter = exporter
        self.num_threads = resolve_threads(num_threads)
        self.plan: Optional[PrecisionPlan] = None
        self.calibration: Optional[CalibrationConfig] = None
        self.annotated_model: Optional[onnx.ModelProto] = None
        self._engine: Optional[Engine] = None
        self._backend: Optional[Backend] = None
        self._report: List[Dict[str, str]] = []
        self._layer_nodes: Dict[str, List[str]] = {}

    # -- building ----------------------------------------------------------------------------
    def _options(self) -> BuildOptions:
        return BuildOptions(max_batch=self.batchsize, opt_batch=self.batchsize, num_threads=self.num_threads)

    def _float_model(self) -> nn.Module:
        return unwrapped_copy(self.model).cpu().float().eval()

    @property
    def input_names(self) -> List[str]:
        return [s.name for s in self.io.inputs]

    @property
    def output_names(self) -> List[str]:
        return list(self.io.output_names)

    @property
    def input_shapes(self) -> List[Tuple[int, ...]]:
        """Input shapes with the batch axis at ``batchsize`` (NNI convention)."""
        return [(self.batchsize,) + s.shape for s in self.io.inputs]

    def _example_inputs(self) -> ModelInputs:
        """Two samples for export and placement: the dummy input's (repeated if it has one), else random."""
        if self.dummy_input is None:
            return self.io.example(2)
        return self.dummy_input.map(lambda t: t[:2] if t.shape[0] >= 2 else t[:1].repeat_interleave(2, 0))

    def compress(self) -> "ModelSpeedup":
        """Export the float model, annotate it per the config, build the engine (and run it
        once on zeros, so the first timed inference is not a warm-up)."""
        if self.model is None:
            raise RuntimeError("this engine was loaded from a file and has no torch model to compress; "
                               "build a new ModelSpeedup from the model instead")
        model = self._float_model()
        example = self._example_inputs()
        resolver = ConfigResolver(self.backend_name, self.extra_layer_bits, self.dynamic, self.calib_data_loader,
                                  self.calib_batches)
        config, extra = resolver.resolve(model, self.config)
        self.calibration = config  # what was built: the config, with what calibrating from data added
        check_calibration(model, config, lambda m: example.call(m))  # the calibration fits this model
        pairs = conv_bn_pairs(model, example)
        folds = choose_folds(model, pairs, config, placed=TENSORS_KEY in config)
        kept = [bn for conv, bn in pairs.items() if conv not in folds]
        split = rules_for(self.backend_name).split_hardswish
        exported = export_onnx(model, example, folds, self.exporter, keep=kept, split_hardswish=split)
        calls = module_calls(exported.model, [n for n, _ in model.named_modules()])
        points, edges = locate_grids(model, exported.model, calls, config, example,
                                            lambda m: export_onnx(m, example, folds, self.exporter, keep=kept,
                                                                  verify=False, split_hardswish=split).model)
        self.plan = build_plan(exported.model, calls, exported.folded, model, config, extra, self.extra_layer_bits,
                               points=points, point_edges=edges, float_layers=resolver.float_layers)
        self.annotated_model = annotate(exported.model, self.plan)
        self._layer_nodes = self.plan.layer_nodes()
        self.io.output_names, self.io.output_structure = exported.output_names, exported.output_structure
        if self.onnx_path:  # the precision-annotated graph, the contract every backend reads
            _atomic_save_onnx(self.annotated_model, self.onnx_path)
        self._backend = get_backend(self.backend_name)
        # the backend's own CPU-side rewrites and conformance checks, before any build
        self.annotated_model = self._backend.prepare(self.annotated_model, self._layer_nodes, config)
        self._backend.check_available()
        options = self._options()
        options.extra.update(layer_nodes=self._layer_nodes, calibration=config)
        self._engine = self._backend.build(self.annotated_model, options)
        self._report = build_report(self.plan, self._engine.node_precisions(), self._backend, exported.model,
                                    self.annotated_model, example.first(1).numpy_feeds())
        self._warm_up()
        for row in self._report:
            if row["kind"] != "summary" and row["actual"] != row["requested"]:
                logger.info("%s %s: requested %s, runs %s (%s)", row["kind"], row["layer"], row["requested"],
                            row["actual"], row["reason"])
        logger.info("%s", self._report[-1]["reason"])
        return self

    # -- running -----------------------------------------------------------------------------
    def _warm_up(self) -> None:
        self._engine.run(self.io.zeros(self.batchsize))
        self._engine.synchronize()

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("no engine yet: call compress() first (or load one with load_quantized_model)")
        return self._engine

    def inference(self, data: Any) -> Tuple[Any, float]:
        """Run the engine on ``data``: the structure the model takes (a float32 tensor or a tuple
        of them with ``input_shape``; with ``dummy_input``, the dummy input's structure and dtypes).

        Returns the model's own output structure (tensors on the CPU) and the wall-clock seconds
        of the whole call: validation, conversion, every chunk of ``batchsize`` and device sync.
        """
        start = time.perf_counter()
        engine = self._require_engine()
        arrays = self.io.validate(data)
        total = arrays[0].shape[0]
        chunks = [engine.run([a[i:i + self.batchsize] for a in arrays]) for i in range(0, total, self.batchsize)]
        engine.synchronize()
        outputs = [torch.from_numpy(np.ascontiguousarray(chunks[0][k] if len(chunks) == 1
                                                         else np.concatenate([c[k] for c in chunks])))
                   for k in range(len(chunks[0]))]
        return self.io.rebuild(outputs), time.perf_counter() - start

    def precision_report(self) -> List[Dict[str, Any]]:
        """What the backend built (:mod:`.precision_report`): a row ``{'kind': 'layer', 'layer',
        'requested', 'actual', 'reason'}`` per configured layer ('int8'|'fp16'|'fp32'|'unknown',
        read from the engine; ``reason`` says why it differs), a row ``kind='op'`` per placed
        operator outside them (residual Add, Concat, pooling...), and a last ``kind='summary'``
        row whose ``integer_mac_share`` is the share of multiply-accumulates in integer kernels."""
        self._require_engine()
        return [dict(row) for row in self._report]

    # -- saving ------------------------------------------------------------------------------
    def export_quantized_model(self, path: str) -> None:
        """Save the built engine with its metadata to ``path`` (atomically)."""
        engine = self._require_engine()
        meta = {"mixq_version": __version__, "backend": self.backend_name,
                "backend_version": self._backend.version(), "input_names": self.input_names,
                "output_names": self.output_names, "input_shapes": [list(s) for s in self.input_shapes],
                "io": self.io.to_meta(), "batchsize": self.batchsize, "layer_nodes": self._layer_nodes,
                "precision_report": self._report, "calibration": self.calibration or {}}
        write_engine_file(path, meta, engine.serialize())
        logger.info("saved %s engine to %s", self.backend_name, path)

    @classmethod
    def load_quantized_model(cls, path: str, num_threads: Optional[int] = None) -> "ModelSpeedup":
        """Load an engine saved by :meth:`export_quantized_model` (same backend and version).

        Every field of the file is checked (:mod:`.engine_meta`) and every failure, the
        backend's included, is an :class:`EngineFormatError` naming the file."""
        threads = resolve_threads(num_threads)
        meta, payload = read_engine_file(path, backend=cls.required_backend)
        backend = get_backend(meta["backend"])
        backend.check_available()
        self = cls.__new__(cls)
        self.model = None
        self.dummy_input = None
        self.batchsize = meta["batchsize"]
        try:
            self.io = EngineIO.from_meta(meta["io"]) if "io" in meta else EngineIO.from_shapes(meta["input_shapes"])
        except ValueError as exc:
            raise EngineFormatError(f"{path}: meta.json's io is invalid ({exc}); export the engine again") from None
        if "io" not in meta:  # engines saved before structured inputs: float32 positional inputs
            self.io.output_names = list(meta["output_names"])
        self.backend_name = meta["backend"]
        self.num_threads = threads
        self.config = self.calibration = meta.get("calibration") or None
        self.plan = None
        self.annotated_model = None
        self._backend = backend
        self._engine = load_engine(backend, meta, payload, self._options(), path, self.io.zeros(1))
        self._report = [dict(r) for r in meta.get("precision_report", [])]
        self._layer_nodes = dict(meta.get("layer_nodes", {}))
        return self


class ModelSpeedupTensorRT(ModelSpeedup):
    """:class:`ModelSpeedup` on the TensorRT backend (NNI's name for it)."""

    default_backend = "tensorrt"
    required_backend = "tensorrt"

    def __init__(self, model: nn.Module, input_shape: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
                 config: Union[CalibrationConfig, str, None] = None, batchsize: Optional[int] = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("backend", "tensorrt")
        super().__init__(model, input_shape, config=config, batchsize=batchsize, **kwargs)


def _atomic_save_onnx(model: onnx.ModelProto, path: str) -> None:
    atomic_write(path, model.SerializeToString())
