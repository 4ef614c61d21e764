"""What the MNIST and CIFAR speedup examples share: options, the strategy x path loop, the table.

For each strategy (all fp32, a mixed config, all int8) and each path (QAT: ``QAT_Quantizer`` +
``export_model``; PTQ: ``ObserverQuantizer`` for the mixed config and
``ModelSpeedup(..., calib_data_loader=...)`` for uniform int8) an engine is built on the chosen
backend, its accuracy measured on the test set and its latency per batch timed.

Each stage prints one line with the time since the start (also when the output goes to a
file; the tqdm bars show only on a terminal). The output folder gets the engines, their
calibration JSON and ``results.json`` (plus the annotated ONNX files with ``--save-onnx``).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mixq.atomic_io import atomic_write
from mixq.quantizers import ObserverQuantizer, QAT_Quantizer
from mixq.speedup import BackendUnavailable, ModelSpeedup, get_backend
from mixq.speedup.backends import resolve_backend_name
from mixq.speedup.precision_report import layer_rows
from mixq.table import format_table
from mixq.timing import time_round_robin

Split = Tuple[torch.Tensor, torch.Tensor]
STRATEGIES = ("fp32", "mixed", "int8")
PATHS = ("qat", "ptq")
_START = time.perf_counter()


def stage(message: str) -> None:
    """One progress line with the seconds since the example started (terminal or file alike)."""
    tqdm.write(f"[{time.perf_counter() - _START:6.1f} s] {message}")
    sys.stdout.flush()


@dataclass
class ExampleSpec:
    """What differs between the examples."""

    name: str
    make_model: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    configs: Dict[str, List[dict]]  # strategy -> config list ('mixed', 'int8')
    lr: float
    qat_lr: float


def build_parser(description: str, epochs: int, quick_note: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "openvino", "tensorrt"], default="auto",
                        help="inference backend (auto: TensorRT with an NVIDIA GPU, else OpenVINO if installed, else ONNX Runtime)")
    parser.add_argument("--data-dir", default=os.environ.get("MIXQ_DATA") or None,
                        help="a torchvision-style dataset root (default: $MIXQ_DATA)")
    parser.add_argument("--epochs", type=int, default=epochs, help="fp32 training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="inference batch size for timing")
    parser.add_argument("--quick", action="store_true", help=quick_note)
    parser.add_argument("--no-download", action="store_true", help="never try to download the data set")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per engine (median is reported)")
    parser.add_argument("--output-dir", default=None, help="where engines, calibration and results go")
    parser.add_argument("--save-onnx", action="store_true", help="also save each engine's annotated ONNX model")
    return parser


def start(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the options and check the backend before any work (a missing one is a one-line error)."""
    args = parser.parse_args()
    quiet_libraries()
    get_backend(resolve_backend_name(args.backend)).check_available()
    return args


def quiet_libraries() -> None:
    """Progress goes to the user; library warnings they cannot act on do not."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def train(model: nn.Module, data: Split, epochs: float, lr: float, desc: str, batch_size: int = 64,
          optimizer: Optional[torch.optim.Optimizer] = None, max_steps: Optional[int] = None) -> None:
    """SGD with momentum and cosine decay; a tqdm bar over steps and a progress line per epoch."""
    x, y = data
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    total = max(1, int(epochs * steps_per_epoch)) if max_steps is None else max_steps
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    gen = torch.Generator().manual_seed(0)
    model.train()
    perm = torch.randperm(len(x), generator=gen)
    bar = tqdm(range(total), desc=desc, unit="step", leave=False, disable=None)
    for step in bar:
        i = (step % steps_per_epoch) * batch_size
        if i == 0 and step:
            perm = torch.randperm(len(x), generator=gen)
        idx = perm[i:i + batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
            stage(f"{desc}: step {step + 1}/{total}, loss {loss.item():.3f}")
    model.eval()


def engine_accuracy(engine: ModelSpeedup, data: Split, batch_size: int) -> float:
    x, y = data
    correct = 0
    for i in range(0, len(x), batch_size):
        out, _ = engine.inference(x[i:i + batch_size])
        correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(x)


def interleaved_latency(engines: Dict[str, ModelSpeedup], batch: torch.Tensor, runs: int) -> Dict[str, float]:
    """Median milliseconds of ``inference(batch)`` per engine, timed round-robin after warm-up so
    that load from other processes on a shared machine falls on every engine alike."""
    calls = {label: (lambda engine=engine: engine.inference(batch)) for label, engine in engines.items()}
    timed = time_round_robin(calls, runs, progress=lambda r: tqdm(r, desc="timing engines", unit="round",
                                                                  leave=False, disable=None))
    return {label: latency.median_s * 1e3 for label, latency in timed.items()}


BITS = {"int8": 8, "fp16": 16, "fp32": 32}


def average_bits(model: nn.Module, report: List[dict]) -> float:
    """Requested weight bit width averaged over all Conv/Linear parameters (unlisted layers: fp32)."""
    requested = {r["layer"]: BITS[r["requested"]] for r in report}
    total = weighted = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            total += module.weight.numel()
            weighted += module.weight.numel() * requested.get(name, 32)
    return weighted / total


def run_example(spec: ExampleSpec, args: argparse.Namespace, train_data: Split, test_data: Split,
                qat_steps: int, calib_batches: int, runs: int, fp32_steps: Optional[int]) -> List[dict]:
    """Train fp32, build every strategy x path engine, print the table, write results.json."""
    out_dir = Path(args.output_dir or f"output/{spec.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = spec.make_model()
    train(model, train_data, args.epochs, spec.lr, "train fp32", max_steps=fp32_steps)
    fp32_torch_acc = engine_free_accuracy(model, test_data)
    stage(f"fp32 PyTorch accuracy: {fp32_torch_acc:.2f}%")
    calib_x = train_data[0][: calib_batches * 64]
    calib_loader = [calib_x[i:i + 64] for i in range(0, len(calib_x), 64)]
    timing_batch = test_data[0][: args.batch_size]
    if len(timing_batch) < args.batch_size:
        timing_batch = timing_batch.repeat((args.batch_size + len(timing_batch) - 1) // len(timing_batch), 1, 1, 1)
        timing_batch = timing_batch[: args.batch_size]
    rows: List[dict] = []
    engines = {}
    for strategy in STRATEGIES:
        for path in PATHS:
            label = f"{strategy}/{path}"
            if strategy == "fp32" and engines:
                rows.append(dict(rows[0], path=path))
                continue
            stem = out_dir / _file_stem(spec.name, strategy, path)
            engine = _build(spec, args, model, strategy, path, train_data, calib_loader, qat_steps, stem)
            engine.export_quantized_model(f"{stem}.mixq")
            accuracy = engine_accuracy(engine, test_data, args.batch_size)
            report = layer_rows(engine.precision_report())
            engines[label] = engine
            rows.append({"strategy": strategy, "path": path, "backend": engine.backend_name,
                         "avg_bits": round(average_bits(model, report), 2), "accuracy": accuracy,
                         "onnx_bytes": engine.annotated_model.ByteSize(),
                         "precision": {r["layer"]: r["actual"] for r in report},
                         "mismatches": [r for r in report if r["requested"] != r["actual"]]})
            stage(f"{'fp32' if strategy == 'fp32' else label}: engine built, {accuracy:.2f}% accuracy")
    latencies = interleaved_latency(engines, timing_batch, runs)
    stage(f"timed {len(engines)} engines, {runs} rounds")
    for row in rows:
        row["latency_ms"] = latencies["fp32/qat" if row["strategy"] == "fp32" else f"{row['strategy']}/{row['path']}"]
    fp32_row = rows[0]
    for row in rows:
        row["speedup"] = fp32_row["latency_ms"] / row["latency_ms"]
    document = {"example": spec.name, "backend": rows[0]["backend"], "batch_size": args.batch_size,
                "fp32_torch_accuracy": fp32_torch_acc, "quick": bool(args.quick), "rows": rows}
    atomic_write(out_dir / "results.json", json.dumps(document, indent=1))
    print(results_table(rows, args.batch_size))
    _plot(rows, out_dir / "accuracy_vs_latency.png", spec.name)
    print(f"\nengines, calibration and results.json are in {out_dir}")
    return rows


def engine_free_accuracy(model: nn.Module, data: Split) -> float:
    x, y = data
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum().item() for i in range(0, len(x), 500))
    return 100.0 * correct / len(x)


def _file_stem(name: str, strategy: str, path: str) -> str:
    """``mnist_fp32`` (one fp32 engine serves both paths), ``mnist_int8_qat``, ..."""
    return f"{name}_fp32" if strategy == "fp32" else f"{name}_{strategy}_{path}"


def _build(spec: ExampleSpec, args: argparse.Namespace, model: nn.Module, strategy: str, path: str,
           train_data: Split, calib_loader: list, qat_steps: int, stem: Path) -> ModelSpeedup:
    common = dict(backend=args.backend, batchsize=args.batch_size, onnx_path=f"{stem}.onnx" if args.save_onnx else None)
    if strategy == "fp32":
        engine = ModelSpeedup(model, spec.input_shape, config=None, extra_layer_bits=32, **common)
        engine.compress()
        return engine
    config_list = spec.configs[strategy]  # which layers at which bits; the backend places the Q/DQ
    backend = resolve_backend_name(args.backend)
    work = copy.deepcopy(model)
    calib_path = f"{stem}_calibration.json"
    if path == "qat":
        optimizer = torch.optim.SGD(work.parameters(), lr=spec.qat_lr, momentum=0.9)
        quantizer = QAT_Quantizer(work, config_list, optimizer, backend=backend)
        quantizer.compress()
        train(work, train_data, 0, spec.qat_lr, f"QAT {strategy}", optimizer=optimizer, max_steps=qat_steps)
        calibration = quantizer.export_model(None, calib_path)
        engine = ModelSpeedup(work, spec.input_shape, config=calibration, **common)
    elif strategy == "int8":
        engine = ModelSpeedup(work, spec.input_shape, config=None, extra_layer_bits=8,
                              calib_data_loader=calib_loader, **common)
    else:
        quantizer = ObserverQuantizer(work, config_list, backend=backend)
        work.eval()
        with torch.no_grad():
            for batch in tqdm(calib_loader, desc=f"calibrate {strategy}", leave=False, disable=None):
                work(batch)
        stage(f"calibrate {strategy}: {len(calib_loader)} batches")
        quantizer.compress()
        calibration = quantizer.export_model(None, calib_path)
        engine = ModelSpeedup(work, spec.input_shape, config=calibration, **common)
    engine.compress()
    return engine


def results_table(rows: List[dict], batch_size: int) -> str:
    headers = ["strategy", "path", "avg bits", f"ms/batch {batch_size}", "speedup", "accuracy %", "ONNX KB",
               "precision that ran"]
    body = []
    for r in rows:
        counts: Dict[str, int] = {}
        for p in r["precision"].values():
            counts[p] = counts.get(p, 0) + 1
        ran = ", ".join(f"{n}x {p}" for p, n in sorted(counts.items()))
        size = f"{r['onnx_bytes'] / 1024:.0f}" if r["onnx_bytes"] else "-"
        body.append([r["strategy"], r["path"], f"{r['avg_bits']:.1f}", f"{r['latency_ms']:.2f}", f"{r['speedup']:.2f}x",
                     f"{r['accuracy']:.2f}", size, ran])
    return "\n" + format_table(headers, body)


def _plot(rows: List[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path.name} not written (it would be {path}): the plot needs matplotlib: pip install mixq[plot] "
              '(from a source checkout: pip install -e ".[plot]")')
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["latency_ms"], r["accuracy"], marker="o" if r["path"] == "qat" else "s")
        ax.annotate(f"{r['strategy']}/{r['path']}", (r["latency_ms"], r["accuracy"]), fontsize=8)
    ax.set_xlabel("latency per batch (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}: accuracy vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_guard(fn: Callable[[], int]) -> None:
    """Run ``fn``; data and configuration mistakes end in one line, not a traceback."""
    try:
        sys.exit(fn())
    except (FileNotFoundError, ValueError, BackendUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

