"""Natural configs on this repository's own models: does a plain config give the tuned speedup?

The MNIST model and the CIFAR ResNet-18 (``mixq.models``) are calibrated with
``ObserverQuantizer`` (8 bits, the backend's placement) under the configs a user writes, and
every engine is timed on ONNX Runtime (batch 128, each engine in its own process,
round-robin, best round). The table gives, per config: how many configured layers run as
requested, the share of multiply-accumulates in integer kernels, the speedup over mixq's fp32
engine and that speedup as a share of the tuned benchmark config's (the target is >= 90%).

    python3 benchmarks/natural_configs.py [--batch 128] [--rounds 3]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ort_baseline import TimedEngine, time_round_robin  # noqa: E402
from speedup import AFFINE_U8, calibrate, mnist_config, resnet_config, resnet_with_data_bn, trained_mnist  # noqa: E402
from zoo import cpu_name  # noqa: E402

from mixq.datasets import load_mnist  # noqa: E402
from mixq.speedup import ModelSpeedup  # noqa: E402
from mixq.speedup.precision_report import layer_rows, summary_row  # noqa: E402
from mixq.table import format_table  # noqa: E402

WEIGHTED = ["Conv2d", "Linear"]


def natural_configs(relu_type: str) -> List[Tuple[str, Optional[list]]]:
    """The configs of issue #10's table, as a user would write them."""
    return [
        ("NNI pattern: weight+output on convs/fcs, output on ReLUs",
         [{"quant_types": ["weight", "output"], "quant_bits": 8, "op_types": WEIGHTED},
          {"quant_types": ["output"], "quant_bits": 8, "op_types": [relu_type]}]),
        ("weight, input, output on Conv2d/Linear",
         [{"quant_types": ["weight", "input", "output"], "quant_bits": 8, "op_types": WEIGHTED}]),
        ("weight, input on Conv2d/Linear",
         [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": WEIGHTED}]),
        ("weight, input on Conv2d/Linear + output on ReLUs",
         [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": WEIGHTED},
          {"quant_types": ["output"], "quant_bits": 8, "op_types": [relu_type]}]),
    ]


def build(name: str, model: torch.nn.Module, shape: List[int], configs, calib: torch.Tensor, tmp: str,
          threads: int) -> List[Dict[str, object]]:
    rows = []
    for label, config_list in configs:
        kwargs: Dict[str, object] = {}
        if config_list == "auto":
            kwargs = dict(extra_layer_bits=8, calib_data_loader=[calib[i:i + 128] for i in range(0, len(calib), 128)])
        elif config_list is not None:
            kwargs = dict(config=calibrate(model, config_list, calib))
        engine = ModelSpeedup(model, tuple(shape), batchsize=shape[0], num_threads=threads, **kwargs).compress()
        report = engine.precision_report()
        layers = layer_rows(report)
        path = os.path.join(tmp, f"{name}-{len(rows)}.mixq")
        engine.export_quantized_model(path)
        rows.append({"model": name, "config": label, "engine": TimedEngine("mixq", path),
                     "as_requested": f"{sum(r['actual'] == r['requested'] for r in layers)}/{len(layers)}",
                     "int_macs": summary_row(report)["integer_mac_share"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mnist, mx, (resnet, calib, source) = trained_mnist(), load_mnist()[0][0], resnet_with_data_bn()
    print(f"{cpu_name()}, {args.threads} threads, batch {args.batch}; each engine in its own process, best of "
          f"{args.rounds} round-robin rounds; ResNet-18 calibrated on {source}")
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="mixq-natural-") as tmp:
        for name, model, shape, relu, tuned, data in (
                ("MNIST", mnist, [args.batch, 1, 28, 28], "ReLU6", mnist_config(False, AFFINE_U8), mx[:512]),
                ("ResNet-18", resnet, [args.batch, 3, 32, 32], "ReLU", resnet_config(resnet, False, AFFINE_U8), calib)):
            configs = [("fp32", None)] + natural_configs(relu) + [("tuned benchmark config", tuned),
                                                                  ("automatic path", "auto")]
            rows += build(name, model, shape, configs, data, tmp, args.threads)
        feeds = {name: torch.randn(*shape).numpy() for name, shape in
                 (("MNIST", [args.batch, 1, 28, 28]), ("ResNet-18", [args.batch, 3, 32, 32]))}
        for name in feeds:
            group = [r for r in rows if r["model"] == name]
            latency = time_round_robin({r["config"]: r["engine"] for r in group}, feeds[name], rounds=args.rounds,
                                       threads=args.threads)
            for r in group:
                r["ms"] = latency[r["config"]] * 1e3
    table = []
    for name in feeds:
        group = {r["config"]: r for r in rows if r["model"] == name}
        fp32, tuned = group["fp32"]["ms"], group["tuned benchmark config"]["ms"]
        for label, r in group.items():
            speedup = fp32 / r["ms"]
            table.append([name, label, r["as_requested"], f"{r['int_macs']:.1%}", f"{r['ms']:.2f}", f"{speedup:.2f}x",
                          "-" if label == "fp32" else f"{speedup / (fp32 / tuned):.0%}"])
    print(format_table(["model", "config (ObserverQuantizer, 8 bits)", "layers as requested", "int MACs", "ms/batch",
                        "vs fp32 engine", "of tuned speedup"], table))


if __name__ == "__main__":
    main()
