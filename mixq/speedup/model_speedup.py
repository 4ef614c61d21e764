"""ModelSpeedup: calibration config -> precision-annotated ONNX -> backend engine -> inference.

    engine = ModelSpeedup(model, (32, 1, 28, 28), config=calibration_config)
    engine.compress()
    output, latency_s = engine.inference(images)
    engine.precision_report()   # [{'layer': 'conv1', 'requested': 'int8', 'actual': 'int8', 'reason': ''}, ...]

``input_shape`` includes the batch dimension (NNI convention) and may be a list of shapes for
a model with several inputs; the batch axis is dynamic, and ``inference`` accepts any batch
size, running chunks of at most ``batchsize``. The user's model is never modified (a wrapped
model is unwrapped on a copy).

``config`` is a calibration config (dict or JSON path from ``quantizer.export_model``). Entries
that give only bit widths (no ranges) are calibrated from ``calib_data_loader`` with the
:class:`~mixq.quantizers.ObserverQuantizer`. ``extra_layer_bits`` sets the precision of
Conv/Linear layers the config does not mention: 32 (fp32, default), 16 (fp16) or 8 (int8,
calibrated from ``calib_data_loader``: weights and inputs of those layers plus the outputs of
activations and of layers not followed by one; activations are affine uint8 for ONNX Runtime,
as its own quantizer does, and symmetric int8 for TensorRT, which requires it).
"""
from __future__ import annotations

import copy
import difflib
import logging
import os
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..compressor.calibration import (PLACEMENT_KEY, TENSORS_KEY, CalibrationConfig, layer_entries,
                                     load_calibration_config, validate_calibration_config)
from ..compressor.config import WEIGHT_TYPES
from ..compressor.fake_quant import is_integer_bits
from ..compressor.wrapper import QuantizerModuleWrapper, unwrapped_copy
from .backends import get_backend, resolve_backend_name
from .backends.base import Backend, BuildOptions, Engine, EngineFormatError
from .engine_file import read_engine_file, write_engine_file
from .module_map import module_calls
from .onnx_export import DEFAULT_EXPORTER, conv_bn_pairs, export_onnx
from .onnx_qdq import annotate
from ..placement.locate import locate_points
from .precision_plan import PrecisionPlan, build_plan, choose_folds, grid_from_range
from .precision_report import build_report

logger = logging.getLogger(__name__)

Shape = Tuple[int, ...]
EXTRA_LAYER_BITS = (8, 16, 32)
QUANT_TYPES = ("weight", "input", "output")


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


def _has_ranges(entry: Dict[str, Any]) -> bool:
    for qtype in QUANT_TYPES:
        bits = entry.get(f"{qtype}_bits")
        if bits is None or not is_integer_bits(bits):
            continue
        needed = ["weight_scale"] if qtype == "weight" else [f"tracked_min_{qtype}", f"tracked_max_{qtype}"]
        if any(k not in entry for k in needed):
            return False
    return True


def _config_list_entry(name: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    types = [t for t in QUANT_TYPES if f"{t}_bits" in entry]
    item: Dict[str, Any] = {"op_names": [name], "quant_types": types,
                            "quant_bits": {t: entry[f"{t}_bits"] for t in types}}
    for key in ("scheme", "dtype"):
        values = {t: entry[f"{t}_{key}"] for t in types if f"{t}_{key}" in entry}
        if values:
            item[f"quant_{key}"] = values
    return item


def _as_inputs(batch: Any) -> Tuple[torch.Tensor, ...]:
    """Model inputs of one calibration batch: a tensor, or the first item of (inputs, labels)."""
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if torch.is_tensor(first):
            return (first,)
        if isinstance(first, (tuple, list)) and all(torch.is_tensor(t) for t in first):
            return tuple(first)
    raise TypeError("calib_data_loader must yield tensors or (inputs, labels) pairs; got "
                    f"{type(batch).__name__}")


class ModelSpeedup:
    """Build and run a mixed-precision inference engine from a calibration config.

    Args:
        model: the float model, or one wrapped by a quantizer (it is copied, never modified).
        input_shape: shape with the batch dimension, or a list of shapes for several inputs.
        config: calibration config (dict or JSON path); None quantizes nothing but extra layers.
        backend: 'onnxruntime' (default), 'tensorrt' or 'auto'.
        batchsize: largest batch one engine run takes (default: ``input_shape[0]``); bigger
            inputs are run in chunks of it.
        onnx_path: where to save the precision-annotated ONNX model, if wanted.
        extra_layer_bits: precision of Conv/Linear layers absent from ``config``: 32, 16 or 8.
        calib_data_loader: batches (tensors or (inputs, labels)) for ranges the config lacks.
        calib_batches: how many of its batches to use (default: all).
        exporter: 'torchscript' (default) or 'dynamo' (see :mod:`mixq.speedup.onnx_export`).
        num_threads: CPU threads of the engine (default: the cores this process may use).
    """

    default_backend = "onnxruntime"
    required_backend: Optional[str] = None  # what load_quantized_model accepts (None: any)

    def __init__(self, model: nn.Module, input_shape: Union[Sequence[int], Sequence[Sequence[int]]],
                 config: Union[CalibrationConfig, str, None] = None, backend: Optional[str] = None,
                 batchsize: Optional[int] = None, onnx_path: Optional[str] = None, extra_layer_bits: int = 32,
                 calib_data_loader: Optional[Iterable[Any]] = None, calib_batches: Optional[int] = None,
                 exporter: str = DEFAULT_EXPORTER, num_threads: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if extra_layer_bits not in EXTRA_LAYER_BITS:
            raise ValueError(f"extra_layer_bits must be one of {EXTRA_LAYER_BITS}, got {extra_layer_bits!r}")
        self.model = model
        self.input_shapes = _normalize_shapes(input_shape)
        self.batchsize = int(batchsize if batchsize is not None else self.input_shapes[0][0])
        if self.batchsize < 1:
            raise ValueError(f"batchsize must be >= 1, got {batchsize}")
        self.config = load_calibration_config(config) if isinstance(config, (str, os.PathLike)) else config
        self.backend_name = resolve_backend_name(backend or self.default_backend)
        self.onnx_path = onnx_path
        self.extra_layer_bits = extra_layer_bits
        self.calib_data_loader = calib_data_loader
        self.calib_batches = calib_batches
        self.exporter = exporter
        self.num_threads = num_threads or _default_threads()
        self.input_names: List[str] = []
        self.output_names: List[str] = []
        self.plan: Optional[PrecisionPlan] = None
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

    def _example_inputs(self) -> List[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(2, *shape[1:], generator=gen) for shape in self.input_shapes]

    def _extra_layers(self, model: nn.Module, config: CalibrationConfig) -> List[str]:
        return [n for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES) and n not in config]

    def _auto_config_list(self, layers: List[str]) -> List[Dict[str, Any]]:
        """Config list making ``layers`` int8: the backend's placement quantizes what they need."""
        return [{"op_names": list(layers), "quant_types": ["weight"], "quant_bits": 8}] if layers else []

    def _calibrate(self, model: nn.Module, config_list: List[Dict[str, Any]]) -> CalibrationConfig:
        from ..quantizers import ObserverQuantizer

        if self.calib_data_loader is None:
            raise ValueError("activation ranges are missing (config entries without tracked ranges, or "
                             "extra_layer_bits=8): pass calib_data_loader= with a few batches of real inputs")
        clone = copy.deepcopy(model)
        quantizer = ObserverQuantizer(clone, config_list, backend=self.backend_name)
        seen = 0
        with torch.no_grad():
            for i, batch in enumerate(self.calib_data_loader):
                if self.calib_batches is not None and i >= self.calib_batches:
                    break
                clone(*(t.float().cpu() for t in _as_inputs(batch)))
                seen += 1
        if not seen:
            raise ValueError("calib_data_loader yielded no batch; give it real input batches")
        quantizer.compress()
        logger.info("calibrated %d config entries on %d batches for %s", len(config_list), seen, self.backend_name)
        return quantizer.calibration_config()

    def _resolve_config(self, model: nn.Module) -> Tuple[CalibrationConfig, List[str]]:
        config = dict(self.config or {})
        names = {n for n, _ in model.named_modules()}
        for name in layer_entries(config):
            if name not in names:
                close = difflib.get_close_matches(name, sorted(names), n=3)
                raise ValueError(f"the config names layer {name!r}, which is not a module of the model"
                                 + (f"; close matches: {', '.join(close)}" if close else "")
                                 + ": export the calibration from this model")
        placed = config.get(PLACEMENT_KEY)
        if placed is not None and placed["backend"] != self.backend_name:
            raise ValueError(f"the calibration places quantization for {placed['backend']!r}, this engine is "
                             f"{self.backend_name!r}: calibrate again with the quantizer's "
                             f"backend={self.backend_name!r} (or build with backend={placed['backend']!r})")
        layers = layer_entries(config)
        needs = {name: entry for name, entry in layers.items() if not _has_ranges(entry)}
        extra = self._extra_layers(model, layers)
        if not needs and not (self.extra_layer_bits == 8 and extra):
            return validate_calibration_config(config), ([] if self.extra_layer_bits == 8 else extra)
        # calibrate with one joint placement over every integer layer; keep what the config measured
        config_list = [_config_list_entry(n, e) for n, e in layers.items()]
        if self.extra_layer_bits == 8:
            config_list += self._auto_config_list(extra)
        calibrated = self._calibrate(model, config_list)
        resolved = {n: e for n, e in layers.items() if n not in needs}
        resolved.update({n: e for n, e in layer_entries(calibrated).items() if n not in resolved})
        tensors = dict(calibrated.get(TENSORS_KEY, {}))
        tensors.update({k: v for k, v in config.get(TENSORS_KEY, {}).items() if k in tensors})
        resolved[TENSORS_KEY], resolved[PLACEMENT_KEY] = tensors, calibrated[PLACEMENT_KEY]
        return validate_calibration_config(resolved), ([] if self.extra_layer_bits == 8 else extra)

    def _locate_points(self, model: nn.Module, exported, calls, config: CalibrationConfig, example, export):
        """Grids of a placed calibration's tensors, located in this export."""
        tensors = config.get(TENSORS_KEY)
        if tensors is None:
            return None, None
        located = locate_points(exported.model, calls, model, example, tensors, export)
        for key in located.missing:
            logger.warning("calibration tensor %s has no counterpart in this model's graph; it is not quantized "
                           "(calibrate this model again)", key)
        points = {t: _grid(tensors[k]) for k, t in located.tensors.items()}
        edges = {edge: _grid(tensors[k]) for k, es in located.edges.items() for edge in es}
        return points, edges

    def compress(self) -> "ModelSpeedup":
        """Export the float model, annotate it per the config, build the engine (and run it
        once on zeros, so the first timed inference is not a warm-up)."""
        if self.model is None:
            raise RuntimeError("this engine was loaded from a file and has no torch model to compress; "
                               "build a new ModelSpeedup from the model instead")
        model = self._float_model()
        example = self._example_inputs()
        config, extra = self._resolve_config(model)
        pairs = conv_bn_pairs(model, example)
        folds = choose_folds(model, pairs, config, placed=TENSORS_KEY in config)
        kept = [bn for conv, bn in pairs.items() if conv not in folds]
        exported = export_onnx(model, example, folds, self.exporter, keep=kept)
        calls = module_calls(exported.model, [n for n, _ in model.named_modules()])
        points, edges = self._locate_points(model, exported, calls, config, example,
                                            lambda m: export_onnx(m, example, folds, self.exporter, keep=kept).model)
        self.plan = build_plan(exported.model, calls, exported.folded, model, config, extra, self.extra_layer_bits,
                               points=points, point_edges=edges)
        self.annotated_model = annotate(exported.model, self.plan)
        self._layer_nodes = self.plan.layer_nodes()
        self.input_names, self.output_names = exported.input_names, exported.output_names
        self._backend = get_backend(self.backend_name)
        # the backend's own CPU-side rewrites and conformance checks, before any build
        self.annotated_model = self._backend.prepare(self.annotated_model, self._layer_nodes, config)
        if self.onnx_path:
            _atomic_save_onnx(self.annotated_model, self.onnx_path)
        self._backend.check_available()
        options = self._options()
        options.extra.update(layer_nodes=self._layer_nodes, calibration=config)
        self._engine = self._backend.build(self.annotated_model, options)
        self._report = build_report(self.plan, self._engine.node_precisions(), self._backend, exported.model,
                                    self.annotated_model)
        self._warm_up()
        for row in self._report:
            if row["kind"] != "summary" and row["actual"] != row["requested"]:
                logger.info("%s %s: requested %s, runs %s (%s)", row["kind"], row["layer"], row["requested"],
                            row["actual"], row["reason"])
        logger.info("%s", self._report[-1]["reason"])
        return self

    # -- running -----------------------------------------------------------------------------
    def _warm_up(self) -> None:
        self._engine.run([np.zeros((self.batchsize,) + tuple(s[1:]), dtype=np.float32) for s in self.input_shapes])
        self._engine.synchronize()

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("no engine yet: call compress() first (or load one with load_quantized_model)")
        return self._engine

    def _validate(self, data: Any) -> List[np.ndarray]:
        items = list(data) if isinstance(data, (tuple, list)) else [data]
        n_inputs = len(self.input_shapes)
        if len(items) != n_inputs:
            raise ValueError(f"the engine takes {n_inputs} input(s), got {len(items)}: pass "
                             f"{'one tensor' if n_inputs == 1 else 'a tuple of ' + str(n_inputs) + ' tensors'}")
        arrays = []
        for i, (item, shape) in enumerate(zip(items, self.input_shapes)):
            where = f"input {i}" if n_inputs > 1 else "the input"
            if isinstance(item, np.ndarray):
                item = torch.from_numpy(item)
            if not torch.is_tensor(item):
                raise TypeError(f"{where} must be a torch tensor, got {type(item).__name__}")
            expected = ("N",) + tuple(shape[1:])
            if item.dim() != len(shape):
                raise ValueError(f"{where} has shape {tuple(item.shape)} (rank {item.dim()}); the engine expects "
                                 f"{expected} (rank {len(shape)}): add or remove dimensions, e.g. x.unsqueeze(0)")
            if tuple(item.shape[1:]) != tuple(shape[1:]):
                raise ValueError(f"{where} has shape {tuple(item.shape)}; the engine was built for {expected}: "
                                 "resize the data or build the engine with that input_shape")
            if item.shape[0] == 0:
                raise ValueError(f"{where} has batch size 0; pass at least one sample")
            if item.dtype != torch.float32:
                raise ValueError(f"{where} has dtype {item.dtype}; the engine takes torch.float32: pass x.float()")
            array = item.detach().cpu().contiguous().numpy()
            # numpy, not torch: torch's OpenMP pool would spin beside the engine's threads
            if not np.isfinite(array).all():
                bad = "NaN" if np.isnan(array).any() else "infinity"
                raise ValueError(f"{where} contains {bad}; clean the data (e.g. torch.nan_to_num) before inference")
            arrays.append(array)
        sizes = {a.shape[0] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"the inputs have different batch sizes {sorted(sizes)}; they must match")
        return arrays

    def inference(self, data: Any) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, ...]], float]:
        """Run the engine on ``data`` (a float32 tensor, or a tuple for several inputs).

        Returns (output tensor, or a tuple of them, on the CPU) and the wall-clock seconds of
        the whole call: validation, conversion, every chunk of ``batchsize`` and device sync.
        """
        start = time.perf_counter()
        engine = self._require_engine()
        arrays = self._validate(data)
        total = arrays[0].shape[0]
        chunks = [engine.run([a[i:i + self.batchsize] for a in arrays]) for i in range(0, total, self.batchsize)]
        engine.synchronize()
        outputs = [torch.from_numpy(np.ascontiguousarray(np.concatenate([c[k] for c in chunks])))
                   for k in range(len(chunks[0]))]
        result = outputs[0] if len(outputs) == 1 else tuple(outputs)
        return result, time.perf_counter() - start

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
        import mixq

        meta = {"mixq_version": mixq.__version__, "backend": self.backend_name,
                "backend_version": self._backend.version(), "input_names": self.input_names,
                "output_names": self.output_names, "input_shapes": [list(s) for s in self.input_shapes],
                "batchsize": self.batchsize, "layer_nodes": self._layer_nodes,
                "precision_report": self._report, "calibration": self.config or {}}
        write_engine_file(path, meta, engine.serialize())
        logger.info("saved %s engine to %s", self.backend_name, path)

    @classmethod
    def load_quantized_model(cls, path: str, num_threads: Optional[int] = None) -> "ModelSpeedup":
        """Load an engine saved by :meth:`export_quantized_model` (same backend and version)."""
        meta, payload = read_engine_file(path, backend=cls.required_backend)
        backend = get_backend(meta["backend"])
        backend.check_available()
        if meta["backend_version"] != backend.version():
            raise EngineFormatError(f"{path} was built with {meta['backend']} {meta['backend_version']}, this is "
                                    f"{backend.version()}: rebuild the engine with compress() and export it again")
        self = cls.__new__(cls)
        self.model = None
        self.input_shapes = [tuple(s) for s in meta["input_shapes"]]
        self.batchsize = int(meta["batchsize"])
        self.backend_name = meta["backend"]
        self.num_threads = num_threads or _default_threads()
        self.input_names, self.output_names = list(meta["input_names"]), list(meta["output_names"])
        self.config = meta.get("calibration") or None
        self.plan = None
        self.annotated_model = None
        self._backend = backend
        self._engine = backend.deserialize(payload, self._options())
        self._report = [dict(r) for r in meta.get("precision_report", [])]
        self._layer_nodes = dict(meta.get("layer_nodes", {}))
        self._warm_up()
        return self


class ModelSpeedupTensorRT(ModelSpeedup):
    """:class:`ModelSpeedup` on the TensorRT backend (NNI's name for it)."""

    default_backend = "tensorrt"
    required_backend = "tensorrt"

    def __init__(self, model: nn.Module, input_shape: Union[Sequence[int], Sequence[Sequence[int]]],
                 config: Union[CalibrationConfig, str, None] = None, batchsize: Optional[int] = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("backend", "tensorrt")
        super().__init__(model, input_shape, config=config, batchsize=batchsize, **kwargs)


def _grid(entry: Dict[str, Any]):
    return grid_from_range(entry["tracked_min"], entry["tracked_max"], entry["bits"], entry["scheme"], entry["dtype"])


def _default_threads() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def _atomic_save_onnx(model: onnx.ModelProto, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mixq-", suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
