"""The ``mixq`` command line: inspect calibration files and saved engines, benchmark engines."""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from typing import Any, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from .compressor.calibration import CalibrationConfig, CalibrationError, load_calibration_config
from .compressor.calibration_record import CalibrationRecord, LayerCalibration, QuantParams
from .compressor.fake_quant import qparams_from_range
from .table import format_table
from .timing import time_calls

_UNITS = ((2 ** 40, "TB"), (2 ** 30, "GB"), (2 ** 20, "MB"), (2 ** 10, "KB"))


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _size(n: float) -> str:
    return next((f"{n / unit:.1f} {name}" for unit, name in _UNITS if n >= unit), f"{n:.0f} bytes")


def _grid_cell(params: QuantParams) -> str:
    lo, hi = params.tracked_min, params.tracked_max
    scale, zp = qparams_from_range(lo, hi, params.bits, params.scheme, params.dtype)
    return f"{params.bits}b [{_fmt(lo)}, {_fmt(hi)}] s={_fmt(float(scale))} zp={int(zp)}"


def _activation_cell(params: Optional[QuantParams]) -> str:
    if params is None:
        return "-"
    if not params.integer or not params.has_range:
        return f"{params.bits}b"
    return _grid_cell(params)


def _weight_cell(layer: LayerCalibration) -> str:
    params = layer.weight
    if params is None:
        return "-"
    if params.scale is None:
        return f"{params.bits}b"
    scales = params.scale
    scale = _fmt(scales[0]) if len(scales) == 1 else f"{_fmt(min(scales))}..{_fmt(max(scales))} ({len(scales)} ch)"
    folded = f" +{layer.folded_bn}" if layer.folded_bn else ""
    return f"{params.bits}b {params.scheme} s={scale}{folded}"


def _layer_cells(layer: LayerCalibration) -> List[str]:
    return [_weight_cell(layer), _activation_cell(layer.input), _activation_cell(layer.output)]


def calibration_table(config: CalibrationConfig) -> str:
    """Per-layer table of a calibration config (bits, scheme, ranges and derived scales), then
    the tensors a backend placement quantizes, if any."""
    record = CalibrationRecord.from_dict(config)
    rows = [[name, layer.type or "?", *_layer_cells(layer)] for name, layer in record.layers.items()]
    table = format_table(["layer", "type", "weight", "input", "output"], rows)
    if not record.tensors:
        return table
    rows = [[key, _grid_cell(params)] for key, params in record.tensors.items()]
    return (table + f"\n\ntensors placed for {record.backend}\n"
            + format_table(["tensor", "range"], rows))


def _dynamic_batch(shape: Sequence[int]) -> str:
    """``[N, 1, 28, 28]``: an engine's batch axis is dynamic."""
    return "[" + ", ".join(["N"] + [str(d) for d in shape[1:]]) + "]"


def engine_table(path: str) -> str:
    """Header and per-layer table of a saved engine: calibration cells plus requested vs actual precision."""
    from .speedup.engine_file import read_engine_file
    meta, payload = read_engine_file(path)
    layers = CalibrationRecord.from_dict(meta.get("calibration") or {}).layers
    rows, summary = [], ""
    for r in meta.get("precision_report", []):
        if r.get("kind") == "summary":
            summary = f"\n\n{r['actual']}: {r.get('reason', '')}"
            continue
        layer = layers.get(r["layer"], LayerCalibration()) if r.get("kind", "layer") == "layer" else LayerCalibration()
        rows.append([r["layer"], *_layer_cells(layer), r["requested"], r["actual"], r.get("reason", "")])
    inputs = ", ".join(f"{name} {_dynamic_batch(shape)}" for name, shape in zip(meta["input_names"], meta["input_shapes"]))
    head = (f"{meta['backend']} {meta['backend_version']} engine {path} ({len(payload) / 1024:.0f} KB), "
            f"inputs {inputs}, outputs {', '.join(meta['output_names'])}")
    table = format_table(["layer", "weight", "input", "output", "requested", "actual", "reason"], rows)
    return head + "\n" + table + summary


def _inspect(path: str) -> str:
    if zipfile.is_zipfile(path):
        return engine_table(path)
    return f"calibration config {path}\n" + calibration_table(load_calibration_config(path))


def _available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _random_inputs(engine: Any, batch_size: int) -> Any:
    """``batch_size`` samples of what the engine takes (normal floats, zeros for integer inputs),
    in the structure ``inference`` takes; refused when they would not fit in memory."""
    needed = batch_size * sum(int(np.prod(s.shape, dtype=np.float64)) * s.dtype.itemsize for s in engine.io.inputs)
    available = _available_memory()
    if needed > available // 2:
        raise ValueError(f"--batch-size {batch_size} needs {_size(needed)} of input data, and {_size(available)} of "
                         "memory is available: use a smaller --batch-size")
    example = engine.io.example(batch_size)
    if example.kwargs:
        return dict(example.kwargs)
    return example.args[0] if len(example.args) == 1 else example.args


def _bench(path: str, batch_size: int, runs: int, warmup: int) -> str:
    from .speedup import ModelSpeedup
    engine = ModelSpeedup.load_quantized_model(path)
    x = _random_inputs(engine, batch_size)
    latency = time_calls(lambda: engine.inference(x), runs, warmup,
                         progress=lambda r: tqdm(r, desc="timing", unit="run", file=sys.stderr))
    median = latency.median_s * 1e3
    rows = [[engine.backend_name, batch_size, runs, _fmt(median), _fmt(latency.percentile_s(10) * 1e3),
             _fmt(latency.percentile_s(90) * 1e3), f"{batch_size / median * 1e3:.1f}"]]
    return format_table(["backend", "batch", "runs", "median ms", "p10 ms", "p90 ms", "images/s"], rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Inspect and benchmark mixq calibration files and engines.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="per-layer table of a calibration JSON or a saved engine")
    p_inspect.add_argument("file")
    p_bench = sub.add_parser("bench", help="latency table of a saved engine on random input")
    p_bench.add_argument("engine")
    p_bench.add_argument("--batch-size", type=int, required=True)
    p_bench.add_argument("--runs", type=int, default=50)
    p_bench.add_argument("--warmup", type=int, default=5)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mixq`` console script; user mistakes print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            print(_inspect(args.file))
        else:
            if args.batch_size < 1 or args.runs < 1:
                raise ValueError("--batch-size and --runs must be positive")
            if args.warmup < 0:
                raise ValueError(f"--warmup must be 0 or more runs, got {args.warmup}")
            print(_bench(args.engine, args.batch_size, args.runs, args.warmup))
    except MemoryError:
        print(f"mixq {args.command}: error: out of memory; use a smaller --batch-size", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, CalibrationError, json.JSONDecodeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"mixq {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
