"""Real architectures, natural configs: mixq's int8 engines against ONNX Runtime's own quantizer.

For every model of :mod:`mixq.zoo` (random weights, BatchNorm statistics re-estimated on real
images) it builds, on the ONNX Runtime backend:

* the fp32 engine;
* the **natural config** ``[{'quant_types': ['weight', 'input'], 'quant_bits': 8, 'op_types':
  ['Conv2d', 'Linear']}]`` through ``ObserverQuantizer`` -> ``ModelSpeedup(config=...)``;
* the **automatic path** ``ModelSpeedup(config=None, extra_layer_bits=8, calib_data_loader=...)``;
* ONNX Runtime's ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations, MinMax) on
  mixq's own fp32 graph with the same calibration batches, with and without ORT's
  ``quant_pre_process``; the faster of the two (on a timing pass of its own, so that picking it
  does not bias the comparison) is the reference;

and, where OpenVINO is installed, the natural config calibrated for and built on OpenVINO
against OpenVINO's own int8 engine of the model (ORT's QDQ model compiled by OpenVINO);

and prints one table: int8 layers as requested, share of multiply-accumulates in integer
kernels (the report's summary, cross-checked against the kernels of ONNX Runtime's optimized
graph), latency (each engine in its own process, round-robin in rotating order; each engine's
median round, and ratios as the median over rounds of the two engines' ratio in that round;
and the same ratios with natural, auto and ORT timed call by call in this process, which on a
shared machine moves far less than separate processes: ``--alternations``), cosine of the logits
to the fp32 model on held-out images, and top-1 agreement of the engine with the quantizer's
own PyTorch simulation.

    python3 benchmarks/zoo.py [--models resnet50,mobilenet_v2] [--batch 8] [--size 224] [--rounds 5]

The default size is the one these architectures are defined and deployed at (224x224); the
README also gives a run at 128x128 (``--size 128``).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ort_baseline import (INTEGER_MAC_OPS, TimedEngine, cosine, mac_count, make_session, optimized_model,  # noqa: E402
                          ort_quantize_static, paired_ratio, per_image_cosine, run_onnx, time_interleaved,
                          time_rounds)

from mixq.quantizers import ObserverQuantizer  # noqa: E402
from mixq.speedup import ModelSpeedup  # noqa: E402
from mixq.speedup.precision_report import layer_rows, summary_row  # noqa: E402
from mixq.table import format_table  # noqa: E402
from mixq.zoo import ZOO, calibration_batches, image_source, reestimate_bn, sample_images  # noqa: E402

NATURAL = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def integer_mac_share(optimized, feeds: np.ndarray) -> float:
    """Share of multiply-accumulates in integer kernels of the graph ONNX Runtime runs."""
    macs = mac_count(optimized, feeds=feeds)
    op_of = {(n.name or n.output[0]): n.op_type for n in optimized.graph.node}
    total = sum(macs.values())
    return sum(n for k, n in macs.items() if op_of[k] in INTEGER_MAC_OPS) / total if total else 0.0


def _int8_layers(engine: ModelSpeedup) -> str:
    rows = layer_rows(engine.precision_report())
    return f"{sum(r['actual'] == r['requested'] == 'int8' for r in rows)}/{len(rows)}"


def measure(name: str, args: argparse.Namespace, tmp: str) -> Dict[str, object]:
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    calib = calibration_batches(args.calib_batches, args.batch, args.size)
    reestimate_bn(model, calib)
    test = sample_images(args.test_images, args.size, offset=5000)
    with torch.no_grad():
        reference = model(test).numpy()
    shape = (args.batch, 3, args.size, args.size)
    common = dict(batchsize=args.batch, num_threads=args.threads)
    start = time.perf_counter()

    wrapped = copy.deepcopy(model)
    quantizer = ObserverQuantizer(wrapped, NATURAL)
    with torch.no_grad():
        for batch in calib:
            wrapped(batch)
    quantizer.compress()
    with torch.no_grad():
        simulated = wrapped(test).numpy()
    engines = {
        "fp32": ModelSpeedup(model, shape, **common).compress(),
        "natural": ModelSpeedup(model, shape, config=quantizer.calibration_config(), **common).compress(),
        "auto": ModelSpeedup(model, shape, extra_layer_bits=8, calib_data_loader=calib, **common).compress(),
    }
    fp32_graph = engines["fp32"]._engine.serialize()
    feeds_calib = [{"input": b.numpy()} for b in calib]
    ort_models = {"ort": ort_quantize_static(fp32_graph, feeds_calib),
                  "ort+pre": ort_quantize_static(fp32_graph, feeds_calib, pre_process=True)}
    build_s = time.perf_counter() - start

    outputs = {k: e.inference(test)[0].numpy() for k, e in engines.items()}
    for key, model_bytes in ort_models.items():
        outputs[key] = np.concatenate([run_onnx(model_bytes, {"input": test[i:i + args.batch].numpy()})[0]
                                       for i in range(0, len(test), args.batch)])
    if args.openvino:
        ov_wrapped = copy.deepcopy(model)
        ov_quantizer = ObserverQuantizer(ov_wrapped, NATURAL, backend="openvino")
        with torch.no_grad():
            for batch in calib:
                ov_wrapped(batch)
        ov_quantizer.compress()
        engines["ov natural"] = ModelSpeedup(model, shape, config=ov_quantizer.calibration_config(),
                                             backend="openvino", **common).compress()
        with torch.no_grad():
            ov_simulated = ov_wrapped(test).numpy()
        outputs["ov natural"] = engines["ov natural"].inference(test)[0].numpy()
    files = {}
    for key, engine in engines.items():
        files[key] = TimedEngine("mixq", os.path.join(tmp, f"{name}_{key}.mixq"))
        engine.export_quantized_model(files[key].path)
    files.update(ort_models)
    if args.openvino:
        files["ov own"] = TimedEngine("openvino", os.path.join(tmp, f"{name}_ort_qdq.onnx"))
        with open(files["ov own"].path, "wb") as fh:
            fh.write(ort_models["ort"])
    feeds = sample_images(args.batch, args.size, offset=9000).numpy()
    # ORT's faster configuration is the reference, picked on a timing pass of its own: picking the
    # faster of two noisy measurements and then comparing against that same measurement would favour ORT
    selection = time_rounds(ort_models, feeds, rounds=2, threads=args.threads)
    best_ort = min(ort_models, key=lambda k: float(np.median(selection[k])))
    rounds = time_rounds({k: v for k, v in files.items() if k not in ort_models or k == best_ort}, feeds,
                         rounds=args.rounds, threads=args.threads)
    latency = {k: float(np.median(v)) for k, v in rounds.items()}
    session = make_session(ort_models[best_ort], threads=args.threads)
    batch = torch.from_numpy(feeds)
    calls = {"natural": lambda: engines["natural"].inference(batch), "auto": lambda: engines["auto"].inference(batch),
             "ort": lambda: session.run(None, {"input": feeds})}
    together = time_interleaved(calls, alternations=args.alternations)
    latency["ort"], outputs["ort"], rounds["ort"] = latency[best_ort], outputs[best_ort], rounds[best_ort]
    ratios = {"natural_vs_ort": paired_ratio(rounds["natural"], rounds["ort"]),
              "auto_vs_ort": paired_ratio(rounds["auto"], rounds["ort"]),
              "fp32_vs_natural": paired_ratio(rounds["fp32"], rounds["natural"]),
              "natural_vs_ort_together": paired_ratio(together["natural"], together["ort"]),
              "auto_vs_ort_together": paired_ratio(together["auto"], together["ort"])}
    kernel_share = {k: integer_mac_share(engines[k]._engine.optimized_model, feeds) for k in ("natural", "auto")}
    kernel_share["ort"] = integer_mac_share(optimized_model(ort_models[best_ort], args.threads), feeds)
    result = {"model": name, "build_s": build_s, "latency": {k: v * 1e3 for k, v in latency.items()}, "ratios": ratios,
              "layers": {k: _int8_layers(engines[k]) for k in ("natural", "auto")},
              "mac_share": {k: summary_row(engines[k].precision_report())["integer_mac_share"]
                            for k in ("natural", "auto")},
              "kernel_share": kernel_share,
              "cosine": {k: cosine(outputs[k], reference) for k in ("natural", "auto", "ort")},
              "image_cosine": {k: float(np.median(per_image_cosine(outputs[k], reference)))
                               for k in ("natural", "auto", "ort")},
              "ort_variant": best_ort,
              "agreement": float((outputs["natural"].argmax(1) == simulated.argmax(1)).mean()),
              "sim_cosine": cosine(outputs["natural"], simulated)}
    if args.openvino:
        result["openvino"] = {"natural_ms": latency["ov natural"] * 1e3, "own_ms": latency["ov own"] * 1e3,
                              "vs_own": paired_ratio(rounds["ov natural"], rounds["ov own"]),
                              "vs_ort_natural": paired_ratio(rounds["ov natural"], rounds["natural"]),
                              "layers": _int8_layers(engines["ov natural"]),
                              "cosine": cosine(outputs["ov natural"], reference),
                              "agreement": float((outputs["ov natural"].argmax(1) == ov_simulated.argmax(1)).mean())}
    logging.info("%s done in %.0f s", name, build_s)
    return result


def table(results: List[Dict[str, object]]) -> str:
    rows = []
    for r in results:
        lat, cos, icos, share, ratio = r["latency"], r["cosine"], r["image_cosine"], r["mac_share"], r["ratios"]
        rows.append([r["model"], r["layers"]["natural"], r["layers"]["auto"],
                     f"{share['natural']:.1%} ({r['kernel_share']['natural']:.1%}) / {share['auto']:.1%} "
                     f"({r['kernel_share']['auto']:.1%}) / {r['kernel_share']['ort']:.1%}",
                     f"{lat['fp32']:.1f}", f"{lat['natural']:.1f}", f"{lat['auto']:.1f}",
                     f"{lat['ort']:.1f} ({r['ort_variant']})",
                     f"{ratio['natural_vs_ort']:.2f}x / {ratio['auto_vs_ort']:.2f}x",
                     f"{ratio['natural_vs_ort_together']:.2f}x / {ratio['auto_vs_ort_together']:.2f}x",
                     f"{ratio['fp32_vs_natural']:.2f}x",
                     f"{cos['natural']:.4f} / {cos['auto']:.4f} / {cos['ort']:.4f}",
                     f"{icos['natural']:.4f} / {icos['auto']:.4f} / {icos['ort']:.4f}",
                     f"{r['sim_cosine']:.4f}, {r['agreement']:.0%}"])
    headers = ["model", "int8 natural", "int8 auto", "int MACs report (ORT graph) nat/auto/ORT", "fp32 ms", "natural ms", "auto ms",
               "ORT ms", "vs ORT nat/auto", "same, call by call", "int8 vs fp32", "cos to fp32 nat/auto/ORT",
               "median per-image cos nat/auto/ORT", "engine vs sim"]
    return format_table(headers, rows)


def openvino_table(results: List[Dict[str, object]]) -> str:
    rows = [[r["model"], r["openvino"]["layers"], f"{r['openvino']['natural_ms']:.1f}", f"{r['openvino']['own_ms']:.1f}",
             f"{r['openvino']['vs_own']:.2f}x", f"{r['openvino']['vs_ort_natural']:.2f}x",
             f"{r['openvino']['cosine']:.4f}", f"{r['openvino']['agreement']:.0%}"]
            for r in results if "openvino" in r]
    headers = ["model", "int8 natural (OV)", "mixq OV ms", "OV own int8 ms", "vs OV own", "vs mixq ORT",
               "cos to fp32", "OV engine vs sim top-1"]
    return format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated names from mixq.zoo.ZOO")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--alternations", type=int, default=40,
                        help="call-by-call alternations of natural, auto and ORT in this process")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--no-openvino", dest="openvino", action="store_false",
                        help="skip the OpenVINO rows (they need `pip install openvino`)")
    args = parser.parse_args()
    args.openvino = args.openvino and importlib.util.find_spec("openvino") is not None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("mixq", "ort_baseline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(f"{cpu_name()}, {args.threads} threads, batch {args.batch}, 3x{args.size}x{args.size}, "
          f"images: {image_source()}; latency = median of {args.rounds} round-robin rounds (rotating order), each "
          "engine in its own process; ratios = median over rounds of the per-round ratio")
    results = []
    with tempfile.TemporaryDirectory(prefix="mixq-zoo-") as tmp:
        for name in args.models.split(","):
            results.append(measure(name, args, tmp))
            print(table(results[-1:]), flush=True)
    print("\n" + table(results))
    if args.openvino:
        print("\nOpenVINO (natural config calibrated for OpenVINO; OpenVINO's own int8 = ORT's QDQ model compiled by "
              "OpenVINO):\n" + openvino_table(results))


if __name__ == "__main__":
    main()
