"""Sensitivity-driven mixed precision of the CIFAR ResNet-20 checkpoint on the default backend.

    python3 benchmarks/mixed_precision.py [--bits 8] [--budget 1.25] [--test-images 10000] [--plot mixed_precision.png]

Uniform PTQ at --bits (default 8) (ObserverQuantizer, min/max ranges; weights+inputs of every conv/fc and the
outputs of the ReLUs and residual BNs, u8 activations, as ONNX Runtime fuses best) is the
starting point. ``layer_sensitivity`` ranks the conv/fc layers by output SQNR on calibration
data; the Pareto sweep keeps the k most sensitive layers in fp32 and
``auto_mixed_precision(budget=...)`` picks a config under a latency budget, measuring each
candidate config's engine latency (float layers' costs do not add up on ONNX Runtime). Every config is
built into an ONNX Runtime engine (batch 128, 2 threads, thread spinning off); accuracy is the
engine's own on the test images, latency the median of --runs after warm-up, taken round-robin
over the engines --rounds times (each keeps its lowest median, which damps load from elsewhere
on the machine). Prints the sensitivity table and the Pareto table, checks the chosen config
against the uniform config (higher accuracy, >= 80% of its speedup) and saves a PNG plot.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from mixq.search import auto_mixed_precision, format_sensitivity_table, keep_float_layers, layer_sensitivity
from mixq.datasets import load_cifar10, shared_data_dir
from mixq.models import resnet20_cifar
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.timing import best_median_s, time_calls

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "tests" / "data" / "resnet20_cifar.pt"
U8 = {"quant_scheme": "per_tensor_affine", "quant_dtype": "uint"}
BATCH = 128


def uniform_config(model: torch.nn.Module, bits: int) -> List[Dict[str, Any]]:
    """Weights+inputs of every conv/fc, outputs of the ReLUs and of the BNs that feed a residual
    Add, all at ``bits`` (below 8: values on the k-bit grid, run by the int8 kernels)."""
    residual_bns = [n for n, _ in model.named_modules() if n.endswith(".bn2") or n.endswith("shortcut.1")]
    return [{"op_types": ["Conv2d", "Linear"], "quant_types": ["weight", "input"], "quant_bits": bits,
             "quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
             "quant_dtype": {"weight": "int", "input": "uint"}},
            {"op_types": ["ReLU"], "quant_types": ["output"], "quant_bits": bits, **U8},
            {"op_names": residual_bns, "quant_types": ["output"], "quant_bits": bits, **U8}]


def build_engine(model: torch.nn.Module, config_list: Optional[List[Dict[str, Any]]], calib: torch.Tensor,
                 threads: int) -> ModelSpeedup:
    """ObserverQuantizer calibration of ``config_list`` (None: fp32), then an ONNX Runtime engine."""
    calibration = None
    if config_list is not None:
        clone = copy.deepcopy(model)
        quantizer = ObserverQuantizer(clone, config_list)
        with torch.no_grad():
            clone(calib)
        quantizer.compress()
        calibration = quantizer.calibration_config()
    engine = ModelSpeedup(model, (BATCH, 3, 32, 32), config=calibration, backend="onnxruntime", batchsize=BATCH,
                          num_threads=threads)
    return engine.compress()


def engine_accuracy(engine: ModelSpeedup, x: torch.Tensor, y: torch.Tensor) -> float:
    out, _ = engine.inference(x)
    return 100.0 * (out.argmax(1) == y).float().mean().item()


def latencies(engines: Dict[str, ModelSpeedup], batch: torch.Tensor, runs: int, warmup: int, rounds: int
              ) -> Dict[str, float]:
    """Lowest (over rounds) median latency in seconds of one batch, engines timed one at a time."""
    rounds_timed = [{name: time_calls(lambda: engine.inference(batch), runs, warmup) for name, engine in engines.items()}
                    for _ in range(rounds)]
    return {name: best_median_s([timed[name] for timed in rounds_timed]) for name in engines}


def engine_latency(model: torch.nn.Module, calib: torch.Tensor, batch: torch.Tensor,
                   args: argparse.Namespace) -> Callable[[List[Dict[str, Any]]], float]:
    """``cost(config_list)`` for ``auto_mixed_precision``: the built engine's latency (seconds)."""
    def cost(config_list: List[Dict[str, Any]]) -> float:
        engine = build_engine(model, config_list, calib, args.threads)
        return latencies({"": engine}, batch, args.runs, args.warmup, 2)[""]
    return cost


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = [r for r in rows if r["kind"] == "sweep"]
    ax.plot([r["latency"] * 1e3 for r in sweep], [r["accuracy"] for r in sweep], "o-", label="k most sensitive in fp32")
    for r in sweep:
        ax.annotate(str(r["kept"]), (r["latency"] * 1e3, r["accuracy"]), textcoords="offset points", xytext=(4, 4))
    for r in rows:
        if r["kind"] != "sweep":
            ax.plot(r["latency"] * 1e3, r["accuracy"], "*" if r["kind"] == "auto" else "s", markersize=10,
                    label=r["name"])
    ax.set_xlabel(f"latency, batch {BATCH} (ms)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title("ResNet-20 mixed precision, ONNX Runtime CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=shared_data_dir())
    parser.add_argument("--bits", type=int, default=8, help="bit width of the uniform config (weights and activations)")
    parser.add_argument("--budget", type=float, default=1.25, help="latency budget relative to uniform quantization")
    parser.add_argument("--sweep", default="0,1,2,3,4,6,8", help="numbers of fp32 layers in the Pareto sweep")
    parser.add_argument("--samples", type=int, default=512, help="calibration images")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default="mixed_precision.png")
    args = parser.parse_args()
    if args.data is None:
        parser.error("no CIFAR-10 found: pass --data ROOT (the folder holding cifar-10-batches-py)")
    torch.set_num_threads(args.threads)
    (xtr, _), (xte, yte) = load_cifar10(args.data)
    calib, x, y = xtr[:args.samples], xte[:args.test_images], yte[:args.test_images]
    model = resnet20_cifar()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    model.eval()
    config = uniform_config(model, args.bits)
    uniform = f"uniform W{args.bits}A{args.bits}"

    table = layer_sensitivity(model, config, calib)
    print(f"Per-layer sensitivity ({uniform} config, one layer quantized at a time, output SQNR on "
          f"{len(calib)} calibration images):\n")
    print(format_sensitivity_table(table) + "\n")
    order = [r.name for r in table if "weight" in r.bits]
    batch = x[:BATCH].contiguous()
    chosen = auto_mixed_precision(model, config, calib, budget=args.budget,
                                  cost=engine_latency(model, calib, batch, args), sensitivity=table)
    chosen_kept = chosen[-1]["op_names"] if chosen[-1].get("exclude") else []

    configs: Dict[str, Any] = {"fp32": ("fp32", None, len(order))}
    for k in (int(v) for v in args.sweep.split(",")):
        name = uniform if k == 0 else f"{k} most sensitive fp32"
        configs[name] = ("sweep", keep_float_layers(config, order[:k]), k)
    configs[f"auto (budget {args.budget:g})"] = ("auto", chosen, len(chosen_kept))
    engines = {name: build_engine(model, cfg, calib, args.threads) for name, (_, cfg, _) in configs.items()}
    accuracy = {name: engine_accuracy(engine, x, y) for name, engine in engines.items()}
    latency = latencies(engines, batch, args.runs, args.warmup, args.rounds)

    uniform_speedup = latency["fp32"] / latency[uniform]
    rows = [{"name": n, "kind": kind, "kept": kept, "accuracy": accuracy[n], "latency": latency[n]}
            for n, (kind, _, kept) in configs.items()]
    print(f"ResNet-20 on CIFAR-10 ({len(x)} test images), ONNX Runtime CPU, batch {BATCH}, {args.threads} threads\n")
    print("| config | fp32 layers | accuracy % | latency ms | speedup vs fp32 | share of uniform speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        speedup = latency["fp32"] / r["latency"]
        print(f"| {r['name']} | {r['kept']} | {r['accuracy']:.2f} | {r['latency'] * 1e3:.1f} | {speedup:.2f}x | "
              f"{100 * speedup / uniform_speedup:.0f}% |")
    auto = rows[-1]
    print(f"\nauto_mixed_precision kept in fp32: {', '.join(chosen_kept) or 'none'}")
    better = auto["accuracy"] > accuracy[uniform]
    kept_speed = (latency["fp32"] / auto["latency"]) / uniform_speedup
    print(f"chosen config beats {uniform} in accuracy: {better} ({auto['accuracy']:.2f} vs "
          f"{accuracy[uniform]:.2f}); keeps {100 * kept_speed:.0f}% of its speedup (target >= 80%)")
    try:
        plot(rows, args.plot)
        print(f"plot saved to {args.plot}")
    except ImportError:
        print("matplotlib is not installed (pip install 'mixq[plot]'); no plot written", file=sys.stderr)
    return 0 if better and kept_speed >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
