"""ONNX Runtime's own int8 on every mixq.zoo model: latency against fp32, closeness, what stays float.

For each zoo model (random weights, BatchNorm statistics re-estimated on 64 images): export
fp32 ONNX (TorchScript exporter, opset 17, dynamic batch), quantize it with ORT
``quantize_static`` (QDQ, per-channel s8 weights, u8 activations, MinMax on 32 images) with and
without ORT's ``quant_pre_process``, and print one row per engine: latency at batch 8 (each
engine in its own process, round-robin, best of --rounds medians), speedup over fp32, cosine
to torch fp32 on 64 held-out images (over the flattened batch and the per-image median: a few
images dominate the first, see mixq.zoo), the share of multiply-accumulates ORT runs in
integer kernels, and the op types left in float.

    python3 benchmarks/zoo_ort_baseline.py [--models resnet50,googlenet] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import warnings
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.ort_baseline as ob  # noqa: E402
from mixq.zoo import ZOO, calibration_batches, image_source, reestimate_bn, sample_images  # noqa: E402

PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Flatten", "MaxPool", "Transpose", "Reshape", "Identity"}


def export_fp32(model: torch.nn.Module, size: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, size, size), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buf.getvalue()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def rows_for(name: str, args) -> List[Dict[str, object]]:
    torch.manual_seed(0)
    model = reestimate_bn(ZOO[name](), calibration_batches(8, 8, args.size, offset=1000))
    fp32 = export_fp32(model, args.size)
    calib = [b.numpy() for b in calibration_batches(4, 8, args.size)]
    held_out = sample_images(64, args.size, offset=5000)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in held_out.split(16)]).numpy()
    engines = {"fp32": fp32,
               "ORT quantize_static": ob.ort_quantize_static(fp32, calib),
               "ORT pre_process + quantize_static": ob.ort_quantize_static(fp32, calib, pre_process=True)}
    latency = ob.time_round_robin(engines, held_out[:args.batch].numpy(), args.rounds, threads=args.threads)
    rows = []
    for label, engine in engines.items():
        out = ob.run_onnx(engine, held_out.numpy(), args.threads)[0]
        summary = ob.kernel_summary(engine, held_out[:1].numpy(), args.threads)
        left_float = {k: v for k, v in summary["ops"].items()
                      if not k.startswith("QLinear") and k not in PLUMBING and k != "QGemm"}
        rows.append({"model": name, "engine": label, "ms": 1000 * latency[label],
                     "speedup": latency["fp32"] / latency[label], "cos": ob.cosine(out, ref),
                     "cos_img": float(np.median(ob.per_image_cosine(out, ref))),
                     "int": summary["integer_share"], "gmac": summary["total_macs"] / 1e9,
                     "float": ", ".join(f"{k} {v}" for k, v in left_float.items()) if label != "fp32" else "-"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)  # torch only builds and references here; ORT timing uses --threads
    print(f"# {cpu_name()}, {args.threads} threads, batch {args.batch}, 3x{args.size}x{args.size}, "
          f"images: {image_source()}, best of {args.rounds} round-robin medians")
    print(f"{'model':20s} {'engine':34s} {'ms':>8s} {'vs fp32':>8s} {'cos':>6s} {'cos/img':>7s} "
          f"{'int MAC':>7s}  left in float")
    for name in args.models.split(","):
        for r in rows_for(name, args):
            print(f"{r['model']:20s} {r['engine']:34s} {r['ms']:8.1f} {r['speedup']:7.2f}x {r['cos']:6.3f} "
                  f"{r['cos_img']:7.3f} {r['int']:7.1%}  {r['float']}", flush=True)


if __name__ == "__main__":
    main()
