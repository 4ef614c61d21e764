"""Low-bit post-training quantization of the CIFAR ResNet-20 checkpoint: round-to-nearest vs
block reconstruction (AdaRound + QDrop) vs PTMQ multi-bit activations.

    python3 benchmarks/reconstruction.py [--iterations 300] [--test-images 10000]

First and last layers at 8 bits, weights per-channel symmetric, activations (conv/linear
inputs) per-tensor affine unsigned. Round-to-nearest is ObserverQuantizer with MSE-searched
weight ranges and, per bit width, the best of the min/max, percentile and MSE activation
observers. Prints a Markdown table (accuracy on the first --test-images CIFAR-10 test images)
and the wall time of each reconstruction.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from mixq.datasets import load_cifar10, shared_data_dir
from mixq.models import accuracy, resnet20_cifar
from mixq.quantizers import ObserverQuantizer, ReconstructionQuantizer

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "tests" / "data" / "resnet20_cifar.pt"
SCHEME = {"quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
          "quant_dtype": {"weight": "int", "input": "uint"}}
ACTIVATION_OBSERVERS = ("minmax", {"name": "percentile", "percentile": 99.99}, "mse")


def config_list(weight_bits: int, act_bits: int, edge: Tuple[str, ...] = ("conv1", "fc")) -> List[Dict[str, Any]]:
    """W{weight_bits}A{act_bits} on every conv/linear input and weight, the ``edge`` layers at 8 bits."""
    return [{"quant_types": ["weight", "input"], "quant_bits": {"weight": weight_bits, "input": act_bits},
             "op_types": ["Conv2d", "Linear"], **SCHEME},
            {"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": list(edge), **SCHEME}]


def load_model() -> torch.nn.Module:
    model = resnet20_cifar()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval()


def best_round_to_nearest(model: torch.nn.Module, configs: List[Dict[str, Any]], calib: torch.Tensor,
                          x: torch.Tensor, y: torch.Tensor) -> float:
    """Best accuracy of ObserverQuantizer (MSE weight ranges) over the activation observers."""
    best = 0.0
    for act_observer in ACTIVATION_OBSERVERS:
        clone = copy.deepcopy(model)
        entries = [dict(e, observer={"weight": "mse", "input": act_observer}) for e in configs]
        quantizer = ObserverQuantizer(clone, entries)
        with torch.no_grad():
            clone(calib)
        quantizer.compress()
        best = max(best, accuracy(clone, x, y))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=shared_data_dir())
    parser.add_argument("--iterations", type=int, default=300, help="reconstruction steps per unit")
    parser.add_argument("--samples", type=int, default=1024, help="calibration images (from the training set)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.data is None:
        parser.error("no CIFAR-10 found: pass --data ROOT (the folder holding cifar-10-batches-py)")
    torch.set_num_threads(args.threads)
    (xtr, _), (xte, yte) = load_cifar10(args.data)
    calib, x, y = xtr[:args.samples], xte[:args.test_images], yte[:args.test_images]
    model = load_model()
    fp32 = accuracy(model, x, y)
    rows = []
    for wb, ab in ((4, 4), (3, 3)):
        rtn = best_round_to_nearest(model, config_list(wb, ab), calib, x, y)
        clone = copy.deepcopy(model)
        start = time.time()
        ReconstructionQuantizer(clone, config_list(wb, ab), calib, iterations=args.iterations,
                                progress=False).compress()
        rows.append((f"W{wb}A{ab}", rtn, accuracy(clone, x, y), time.time() - start))
    multi_bits = (3, 4, 8)
    clone = copy.deepcopy(model)
    start = time.time()
    quantizer = ReconstructionQuantizer(clone, config_list(4, 4), calib, iterations=args.iterations,
                                        activation_bits=multi_bits, progress=False)
    quantizer.compress()
    multi_time = time.time() - start
    multi = {}
    for level in ("low", "mid", "high"):
        quantizer.set_activation_bits(level)
        multi[level] = accuracy(clone, x, y)

    print(f"CIFAR-10 ResNet-20 (fp32 {fp32:.2f}%, {len(x)} test images, {len(calib)} calibration images, "
          f"{args.iterations} steps per unit, {args.threads} threads; first/last layer 8 bit)\n")
    print("| setting | round-to-nearest (best observer) | reconstruction (AdaRound+QDrop) | recon time |")
    print("|---|---|---|---|")
    for name, rtn, recon, seconds in rows:
        print(f"| {name} | {rtn:.2f} | {recon:.2f} | {seconds:.0f} s |")
    print(f"\nPTMQ multi-bit, W4 with activations {multi_bits} in one calibration ({multi_time:.0f} s):\n")
    print("| level | " + " | ".join(f"{lvl} (A{b})" for lvl, b in zip(multi, multi_bits)) + " |")
    print("|---|---|---|---|")
    print("| accuracy | " + " | ".join(f"{a:.2f}" for a in multi.values()) + " |")


if __name__ == "__main__":
    main()
