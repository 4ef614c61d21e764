"""Latency of mixq engines against fp32 and against ONNX Runtime's own int8 quantization.

Builds fp32, mixed-precision and int8 engines of the MNIST model and the CIFAR ResNet-18 on
ONNX Runtime (CPU) and, where it is installed, OpenVINO (CPU), and prints one table, measured
in one run: latency at
batch 128 with 2 threads (median of at least --runs runs after --warmup runs; fast engines
run about a second's worth), speedup against the fp32 engine and against torch eager fp32,
average weight bits and ONNX file size. Every engine is timed in its own subprocess (with
thread-pool spinning off), so no other session's threads run beside it; the processes run
round-robin --rounds times and each engine keeps its lowest median, which damps load from
elsewhere on the machine. ONNX Runtime's ``quantize_static`` (u8 activations, per-channel s8
weights) on the same fp32 ResNet-18 graph is timed as the reference, on ONNX Runtime and, as
OpenVINO's own int8 engine of the model, compiled by OpenVINO.

Weights are random for timing (ResNet-18) or trained for one short epoch (MNIST); calibration
uses real images (CIFAR-10 from mixq.datasets.shared_data_dir(), else random data, said so).

    python3 benchmarks/speedup.py [--runs 20] [--warmup 5] [--batch 128] [--threads 2] [--rounds 5]
                                  [--backends onnxruntime,openvino]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixq.datasets import load_cifar10, load_mnist, shared_data_dir  # noqa: E402
from mixq.models import MnistNet, resnet18_cifar, train_epochs  # noqa: E402
from mixq.speedup.precision_report import layer_rows  # noqa: E402
from mixq.timing import time_calls  # noqa: E402

AFFINE_U8 = {"quant_scheme": "per_tensor_affine", "quant_dtype": "uint"}


def _weight_entry(types: List[str], act: Dict[str, str]) -> Dict[str, object]:
    return {"quant_types": types, "quant_bits": 8,
            "quant_scheme": {t: ("per_channel_symmetric" if t == "weight" else act["quant_scheme"]) for t in types},
            "quant_dtype": {t: ("int" if t == "weight" else act["quant_dtype"]) for t in types}}


def mnist_config(mixed: bool, act: Dict[str, str]) -> List[Dict[str, object]]:
    """NNI's MNIST layout: weights+inputs of convs/fcs, outputs of the ReLUs before the fcs."""
    config = [{"op_names": ["conv1", "conv2", "fc1", "fc2"], **_weight_entry(["input", "weight"], act)},
              {"op_names": ["relu1", "relu2", "relu3"], "quant_types": ["output"], "quant_bits": 8, **act}]
    if mixed:  # the sensitive first and last layers stay fp32
        config.append({"exclude": True, "op_names": ["conv1", "relu1", "fc2"]})
    return config


def resnet_config(model: torch.nn.Module, mixed: bool, act: Dict[str, str]) -> List[Dict[str, object]]:
    """Weights+inputs of every conv/fc, outputs of the ReLUs and of the BNs that feed a residual Add."""
    residual_bns = [n for n, _ in model.named_modules() if n.endswith(".bn2") or n.endswith("shortcut.1")]
    config = [{"op_types": ["Conv2d", "Linear"], **_weight_entry(["input", "weight"], act)},
              {"op_types": ["ReLU"], "quant_types": ["output"], "quant_bits": 8, **act},
              {"op_names": residual_bns, "quant_types": ["output"], "quant_bits": 8, **act}]
    if mixed:  # stem, first stage and classifier stay fp32
        kinds = (torch.nn.Conv2d, torch.nn.ReLU, torch.nn.BatchNorm2d)
        fp32 = ["conv1", "relu", "fc"] + [n for n, m in model.named_modules()
                                          if n.startswith("layer1.") and isinstance(m, kinds)]
        config.append({"exclude": True, "op_names": fp32})
    return config


def calibrate(model: torch.nn.Module, config_list, images: torch.Tensor, backend: str = "onnxruntime"):
    from mixq.compressor import unwrapped_copy
    from mixq.quantizers import ObserverQuantizer

    clone = unwrapped_copy(model)
    quantizer = ObserverQuantizer(clone, config_list, backend=backend)
    with torch.no_grad():
        for i in range(0, len(images), 128):
            clone(images[i:i + 128])
    quantizer.compress()
    return quantizer.calibration_config()


def average_weight_bits(model: torch.nn.Module, config) -> float:
    total = bits = 0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            n = module.weight.numel()
            total += n
            bits += n * (config or {}).get(name, {}).get("weight_bits", 32)
    return bits / total


def ort_quantize_static(fp32_onnx: str, out_path: str, images: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i:i + 128]} for i in range(0, len(images), 128)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process: the graph is already BN-folded and shaped
    try:
        quantize_static(fp32_onnx, out_path, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Timing (runs in a child process per engine)
# ---------------------------------------------------------------------------------------------

def time_in_child(kind: str, path: str, shape: List[int], args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, path, json.dumps(shape),
           "--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["median_s"])


def child(kind: str, path: str, shape: List[int], runs: int, warmup: int, threads: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    if kind == "mixq":
        from mixq.speedup import ModelSpeedup

        engine = ModelSpeedup.load_quantized_model(path, num_threads=threads)
        run = lambda: engine.inference(x)  # noqa: E731
    elif kind == "onnx":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ort_baseline import make_session  # the zoo's ORT session settings (spinning as mixq's engines)

        session = make_session(path, threads)
        feed = {session.get_inputs()[0].name: x.numpy()}
        run = lambda: session.run(None, feed)  # noqa: E731
    elif kind == "openvino":  # an ONNX model compiled by OpenVINO as the mixq backend compiles its own
        import openvino as ov

        from mixq.speedup.backends.openvino import DEVICE, _config
        from mixq.speedup.backends.base import BuildOptions

        request = ov.Core().compile_model(path, DEVICE, _config(BuildOptions(num_threads=threads))).create_infer_request()
        feed = {0: x.numpy()}
        run = lambda: request.infer(feed)  # noqa: E731
    else:
        torch.set_num_threads(threads)
        model = (MnistNet() if kind == "torch-mnist" else resnet18_cifar()).eval()
        model.load_state_dict(torch.load(path, weights_only=True))

        def run() -> None:
            with torch.no_grad():
                model(x)
    latency = time_calls(run, runs, warmup, min_seconds=1.0)  # fast engines: about a second of runs
    print(json.dumps({"median_s": latency.median_s}))


def trained_mnist() -> MnistNet:
    """The MNIST model after one short epoch on 4,000 vendored images (seeded)."""
    torch.manual_seed(0)
    (mx, my), _, _ = load_mnist()
    mnist = MnistNet()
    train_epochs(mnist, mx[:4000], my[:4000], epochs=1)
    return mnist.eval()


def resnet_with_data_bn() -> Tuple[torch.nn.Module, torch.Tensor, str]:
    """The CIFAR ResNet-18 with random weights and BatchNorm statistics of 512 real CIFAR-10
    images (random data where CIFAR-10 is missing: timing does not depend on it), the images,
    and where they came from."""
    root = shared_data_dir()
    try:
        (cx, _), _ = load_cifar10(root) if root else (None, None)
        calib, source = cx[:512], "real CIFAR-10 images"
    except Exception:  # missing or unreadable data
        calib, source = torch.randn(512, 3, 32, 32), "random data (CIFAR-10 not found)"
    resnet = resnet18_cifar()
    with torch.no_grad():
        resnet.train()
        for i in range(0, len(calib), 128):
            resnet(calib[i:i + 128])
    return resnet.eval(), calib, source


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def build_engines(name: str, model: torch.nn.Module, shape: List[int], configs, calib: torch.Tensor, tmp: str,
                  args, backend: str, reference_onnx: Optional[str] = None) -> List[Dict[str, object]]:
    """Build and save every engine of one model on ``backend``; return rows with what to time
    (torch eager and ORT's ``quantize_static`` reference with the ONNX Runtime rows)."""
    from mixq.speedup import ModelSpeedup

    suffix = "" if backend == "onnxruntime" else f" ({backend})"
    rows = []
    if backend == "onnxruntime":
        state = os.path.join(tmp, f"{name}.pt")
        torch.save(model.state_dict(), state)
        torch_kind = "torch-mnist" if isinstance(model, MnistNet) else "torch-resnet"
        rows.append({"model": name, "engine": "torch eager fp32", "kind": torch_kind, "path": state, "shape": shape,
                     "bits": 32.0, "size": None})
    fp32_onnx = None
    for label, config_list in configs:
        config = calibrate(model, config_list, calib, backend) if config_list else None
        onnx_path = os.path.join(tmp, f"{name}-{label}-{backend}.onnx")
        engine = ModelSpeedup(model, tuple(shape), config=config, batchsize=shape[0], onnx_path=onnx_path,
                              num_threads=args.threads, backend=backend)
        engine.compress()
        not_int8 = [r["layer"] for r in layer_rows(engine.precision_report())
                    if r["requested"] == "int8" and r["actual"] != "int8"]
        if not_int8:
            print(f"# {name} {label}{suffix}: requested int8 but not integer: {not_int8}")
        path = os.path.join(tmp, f"{name}-{label}-{backend}.engine")
        engine.export_quantized_model(path)
        fp32_onnx = fp32_onnx or onnx_path
        rows.append({"model": name, "engine": f"mixq {label}{suffix}", "kind": "mixq", "path": path, "shape": shape,
                     "bits": average_weight_bits(model, config), "size": os.path.getsize(onnx_path)})
    if reference_onnx is not None:
        if not os.path.exists(reference_onnx):
            ort_quantize_static(fp32_onnx, reference_onnx, calib.numpy())
        label, kind = ("ORT quantize_static u8/s8pc", "onnx") if backend == "onnxruntime" else \
            (f"OpenVINO int8 (ORT QDQ){suffix}", backend)
        rows.append({"model": name, "engine": label, "kind": kind, "path": reference_onnx,
                     "shape": shape, "bits": 8.0, "size": os.path.getsize(reference_onnx)})
    return rows


def time_rows(rows: List[Dict[str, object]], args) -> None:
    """Time every engine in its own process, round-robin ``--rounds`` times; keep each engine's
    lowest median (the round least disturbed by other load on the machine)."""
    for r in rows:
        r["latency"] = float("inf")
    for _ in range(args.rounds):
        for r in rows:
            r["latency"] = min(r["latency"], time_in_child(r["kind"], r["path"], r["shape"], args))
    for model in {r["model"] for r in rows}:
        group = [r for r in rows if r["model"] == model]
        fp32 = next(r["latency"] for r in group if r["engine"] == "mixq fp32")  # ONNX Runtime's fp32 engine
        eager = next(r["latency"] for r in group if r["engine"] == "torch eager fp32")
        for r in group:
            r["vs_fp32"], r["vs_torch"] = fp32 / r["latency"], eager / r["latency"]


def print_table(rows: List[Dict[str, object]]) -> None:
    print(f"{'model':10s} {'engine':38s} {'latency ms':>10s} {'vs ORT fp32':>11s} {'vs torch':>9s} "
          f"{'avg bits':>8s} {'ONNX MB':>8s}")
    for r in rows:
        size = f"{r['size'] / 2**20:8.2f}" if r["size"] else f"{'-':>8s}"
        print(f"{r['model']:10s} {r['engine']:38s} {1000 * r['latency']:10.1f} {r['vs_fp32']:10.2f}x "
              f"{r['vs_torch']:8.2f}x {r['bits']:8.1f} {size}")


def check_targets(rows: List[Dict[str, object]]) -> None:
    def get(model: str, engine: str) -> Dict[str, object]:
        return next(r for r in rows if r["model"] == model and r["engine"] == engine)

    r_int8, r_fp32 = get("ResNet-18", "mixq int8"), get("ResNet-18", "mixq fp32")
    r_mixed, ref = get("ResNet-18", "mixq mixed"), get("ResNet-18", "ORT quantize_static u8/s8pc")
    m_int8, m_fp32, m_mixed = get("MNIST", "mixq int8"), get("MNIST", "mixq fp32"), get("MNIST", "mixq mixed")
    checks = [
        ("ResNet-18 int8 >= 3.3x the fp32 engine", r_int8["vs_fp32"] >= 3.3, f"{r_int8['vs_fp32']:.2f}x"),
        ("ResNet-18 int8 >= 5x torch eager fp32", r_int8["vs_torch"] >= 5.0, f"{r_int8['vs_torch']:.2f}x"),
        ("ResNet-18 int8 within 1.1x of ORT quantize_static", r_int8["latency"] <= 1.1 * ref["latency"],
         f"{r_int8['latency'] / ref['latency']:.2f}x"),
        ("ResNet-18 mixed strictly between fp32 and int8", r_int8["latency"] < r_mixed["latency"] < r_fp32["latency"],
         f"{1000 * r_mixed['latency']:.1f} ms"),
        ("MNIST int8 >= 1.5x the fp32 engine", m_int8["vs_fp32"] >= 1.5, f"{m_int8['vs_fp32']:.2f}x"),
        ("MNIST mixed strictly between fp32 and int8", m_int8["latency"] < m_mixed["latency"] < m_fp32["latency"],
         f"{1000 * m_mixed['latency']:.2f} ms"),
        ("ResNet-18 int8 ONNX <= 0.27x the fp32 file", r_int8["size"] <= 0.27 * r_fp32["size"],
         f"{r_int8['size'] / r_fp32['size']:.3f}x"),
        ("MNIST int8 ONNX <= 0.27x the fp32 file", m_int8["size"] <= 0.27 * m_fp32["size"],
         f"{m_int8['size'] / m_fp32['size']:.3f}x"),
    ]
    if any(r["engine"] == "mixq int8 (openvino)" for r in rows):
        o_int8, o_fp32 = get("ResNet-18", "mixq int8 (openvino)"), get("ResNet-18", "mixq fp32 (openvino)")
        o_mixed, o_ref = get("ResNet-18", "mixq mixed (openvino)"), get("ResNet-18", "OpenVINO int8 (ORT QDQ) (openvino)")
        checks += [
            ("ResNet-18 int8 on OpenVINO <= 1.05x OpenVINO's own int8", o_int8["latency"] <= 1.05 * o_ref["latency"],
             f"{o_int8['latency'] / o_ref['latency']:.2f}x"),
            ("ResNet-18 mixed on OpenVINO strictly between its fp32 and int8",
             o_int8["latency"] < o_mixed["latency"] < o_fp32["latency"], f"{1000 * o_mixed['latency']:.1f} ms"),
        ]
    for text, ok, value in checks:
        print(f"  [{'ok' if ok else 'MISS'}] {text}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="round-robin repetitions of every engine's process")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: onnxruntime, and openvino when it is installed)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path, shape = args.child
        child(kind, path, json.loads(shape), args.runs, args.warmup, args.threads)
        return
    if args.runs < 20:
        parser.error("--runs must be at least 20")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    mnist, mx, (resnet, calib, source) = trained_mnist(), load_mnist()[0][0], resnet_with_data_bn()
    print(f"# batch {args.batch}, {args.threads} threads, median of >= {args.runs} runs after {args.warmup}, lowest of "
          f"{args.rounds} round-robin rounds; each engine in its own process; ResNet-18 calibrated on {source}; activations u8 affine, "
          "weights s8 per-channel symmetric (as ONNX Runtime's quantize_static)")
    import importlib.util

    backends = (args.backends.split(",") if args.backends else
                ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else []))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mixq-bench-") as tmp:
        sym = {"quant_scheme": "per_tensor_symmetric", "quant_dtype": "int"}
        for backend in backends:
            rows += build_engines("MNIST", mnist, [args.batch, 1, 28, 28],
                                  [("fp32", None), ("mixed", mnist_config(True, AFFINE_U8)),
                                   ("int8", mnist_config(False, AFFINE_U8))], mx[:512], tmp, args, backend)
            configs = [("fp32", None), ("mixed", resnet_config(resnet, True, AFFINE_U8)),
                       ("int8", resnet_config(resnet, False, AFFINE_U8))]
            if backend == "onnxruntime":
                configs.append(("int8 symmetric act.", resnet_config(resnet, False, sym)))
            rows += build_engines("ResNet-18", resnet, [args.batch, 3, 32, 32], configs, calib, tmp, args, backend,
                                  reference_onnx=os.path.join(tmp, "resnet-ort-qdq.onnx"))
        rows.sort(key=lambda r: r["model"] != "MNIST")  # one block per model
        time_rows(rows, args)
    print_table(rows)
    print("targets (DESIGN.md section 7):")
    check_targets(rows)


if __name__ == "__main__":
    main()
