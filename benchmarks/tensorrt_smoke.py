"""TensorRT smoke run: MNIST and CIFAR ResNet-18 engines at fp32, fp16, int8 and mixed precision.

For each engine: build it through ``ModelSpeedup(backend='tensorrt')``, check the precision
report against the engine inspector (every configured int8/fp16 layer must run at that
precision, no layer may be 'unknown'), compare its outputs with ONNX Runtime running the same
annotated graph on the CPU, and time it with CUDA events on device-resident inputs (batch 128,
warm-up first). The table puts the latencies beside the numbers NNI published for its TensorRT
speedup on a GTX 2080 at batch 128 (random weights here: compare latencies, not accuracy).

    python3 benchmarks/tensorrt_smoke.py                 # ~2-4 min on one GPU
    python3 benchmarks/tensorrt_smoke.py --json out.json

Without the ``tensorrt`` package or a CUDA device it prints one line saying which, and exits 0.
Exit status 1 when a precision check or an output comparison fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixq.models import MnistNet, resnet18_cifar  # noqa: E402
from mixq.quantizers import ObserverQuantizer  # noqa: E402
from mixq.speedup import ModelSpeedup  # noqa: E402
from mixq.speedup.backends import get_backend  # noqa: E402
from mixq.speedup.backends.base import BackendUnavailable  # noqa: E402

# NNI's published TensorRT speedup table (GTX 2080, batch 128), ms per batch; None: not published
NNI_MS = {("mnist", "fp32"): 1.20, ("mnist", "mixed"): 0.75, ("mnist", "int8"): 0.23,
          ("resnet18", "fp32"): 3.29, ("resnet18", "mixed"): 1.36, ("resnet18", "int8"): 0.86}
MNIST_INT8 = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
              {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]}]
MNIST_MIXED = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1", "conv2"]},
               {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2"]},
               {"quant_types": ["weight"], "quant_bits": 16, "op_names": ["fc1"]}]
_RESIDUAL_BNS = [f"layer{s}.{b}.bn2" for s in range(1, 5) for b in (0, 1)] + [f"layer{s}.0.shortcut.1"
                                                                             for s in (2, 3, 4)]
CIFAR_INT8 = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
              {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
              {"quant_types": ["output"], "quant_bits": 8, "op_names": _RESIDUAL_BNS}]
CIFAR_MIXED = CIFAR_INT8 + [
    {"quant_types": ["weight", "input"], "quant_bits": 16, "op_names": ["conv1", "fc"]},
    {"exclude": True, "op_names": ["relu"] + [f"layer1.{b}.{m}" for b in (0, 1)
                                              for m in ("conv1", "relu1", "conv2", "bn2", "relu2")]}]
MODELS = {"mnist": (MnistNet, (1, 28, 28), {"int8": MNIST_INT8, "mixed": MNIST_MIXED}),
          "resnet18": (resnet18_cifar, (3, 32, 32), {"int8": CIFAR_INT8, "mixed": CIFAR_MIXED})}
PRECISIONS = ("fp32", "fp16", "int8", "mixed")


def unavailable() -> Optional[str]:
    """Why TensorRT cannot run here, or None."""
    try:
        get_backend("tensorrt").check_available()
    except BackendUnavailable as exc:
        return str(exc)
    return None


def calibrated(model: nn.Module, config_list: List[dict], images: torch.Tensor) -> Tuple[nn.Module, dict]:
    wrapped = copy.deepcopy(model).eval()
    try:
        quantizer = ObserverQuantizer(wrapped, config_list, backend="tensorrt")
    except TypeError:  # quantizers without per-backend placement
        quantizer = ObserverQuantizer(wrapped, config_list)
    with torch.no_grad():
        for i in range(0, len(images), 64):
            wrapped(images[i:i + 64])
    quantizer.compress()
    return wrapped, quantizer.calibration_config()


def precision_problems(speedup: ModelSpeedup) -> Tuple[List[str], str]:
    """Report rows that disagree with the inspector or with what was requested, and the report's
    integer-MAC summary."""
    inspector = speedup._engine.node_precisions()
    order = {"int8": 0, "fp16": 1, "fp32": 2, "unknown": 3}
    problems, summary = [], ""
    for row in speedup.precision_report():
        kind = row.get("kind", "layer")
        if kind == "summary":
            summary = f"{row['actual']} ({row['reason']})"
            continue
        nodes = speedup._layer_nodes.get(row["layer"], []) if kind == "layer" else [row["layer"]]
        seen = [inspector.get(n, "unknown") for n in nodes]
        widest = max(seen, key=order.__getitem__) if seen else "unknown"
        if widest != row["actual"]:
            problems.append(f"{row['layer']}: report says {row['actual']}, inspector {widest}")
        if row["requested"] in ("int8", "fp16") and widest != row["requested"]:
            problems.append(f"{row['layer']}: requested {row['requested']}, runs {widest} {row['reason']}".strip())
    return problems, summary


def time_engine(engine, x: torch.Tensor, runs: int) -> float:
    """Median milliseconds of one batch on the device (CUDA events), after warm-up."""
    for _ in range(5):
        engine.run_torch_timed([x])
    return 1e3 * statistics.median(engine.run_torch_timed([x])[1] for _ in range(runs))


def reference_outputs(speedup: ModelSpeedup, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(speedup.annotated_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run_one(name: str, precision: str, batch: int, runs: int) -> Dict[str, object]:
    make, shape, configs = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    images = torch.randn(256, *shape, generator=torch.Generator().manual_seed(1))
    config, extra_bits = None, 32
    if precision == "fp16":
        extra_bits = 16
    elif precision in configs:
        model, config = calibrated(model, configs[precision], images)
    start = time.perf_counter()
    speedup = ModelSpeedup(model, (batch,) + shape, config=config, backend="tensorrt", extra_layer_bits=extra_bits)
    speedup.compress()
    build_s = time.perf_counter() - start
    x = images[:batch].contiguous()
    out, _ = speedup.inference(x)
    ref = reference_outputs(speedup, x.numpy())
    got = out.detach().cpu().float().numpy()
    max_diff = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    ms = time_engine(speedup._engine, x.cuda(), runs)
    problems, summary = precision_problems(speedup)
    limit = {"fp32": 1e-3, "fp16": 2e-2}.get(precision, 5e-2)
    ok = not problems and max_diff <= limit and agree >= 0.97
    return {"model": name, "precision": precision, "ms": ms, "nni_ms": NNI_MS.get((name, precision)),
            "build_s": build_s, "max_rel_diff": max_diff, "top1_agreement": agree, "precision_problems": problems,
            "integer_macs": summary, "ok": ok}


def format_rows(rows: List[Dict[str, object]]) -> str:
    header = ["model", "precision", "TensorRT ms (CUDA events)", "NNI GTX 2080 ms", "max |diff| / max |ref|",
              "top-1 agree", "precision check", "build s"]
    lines = [header]
    for r in rows:
        nni = "-" if r["nni_ms"] is None else f"{r['nni_ms']:.2f}"
        check = "ok" if not r["precision_problems"] else f"{len(r['precision_problems'])} problem(s)"
        lines.append([r["model"], r["precision"], f"{r['ms']:.3f}", nni, f"{r['max_rel_diff']:.1e}",
                      f"{r['top1_agreement']:.1%}", check, f"{r['build_s']:.0f}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per engine (median)")
    parser.add_argument("--models", default="mnist,resnet18")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    why = unavailable()
    if why is not None:
        print(f"tensorrt_smoke: skipped, no TensorRT GPU here: {why}")
        return 0
    import tensorrt

    print(f"TensorRT {tensorrt.__version__}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"batch {args.batch_size}")
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            rows.append(run_one(name, precision, args.batch_size, args.runs))
            print(f"  {name} {precision}: {rows[-1]['ms']:.3f} ms, build {rows[-1]['build_s']:.0f} s", flush=True)
    print(format_rows(rows))
    for r in rows:
        if r["integer_macs"]:
            print(f"{r['model']} {r['precision']}: {r['integer_macs']}")
        for problem in r["precision_problems"]:
            print(f"{r['model']} {r['precision']}: {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
