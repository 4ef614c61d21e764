"""Hugging Face BERT and ViT on ONNX Runtime: mixq's int8 engines against ONNX Runtime's own quantizers.

Issue #11's table. The models are built from configs with random weights (nothing is
downloaded) and used as they come: ``BertForSequenceClassification`` (hidden 256, 4 layers, 4
heads, intermediate 1024) on batch 8 x sequence 128 of token ids and attention masks the way a
tokenizer pads them ([CLS] text [SEP] then [PAD]s, 40-100% of each row real text), and
``ViTForImageClassification`` (hidden 192, 4 layers, 3 heads, intermediate 768) on 8 images of
224x224 (CIFAR-10 test images upsampled, or synthetic fields without the data). Rows per model:

* mixq fp32 — ``ModelSpeedup(model, dummy_input=batch)``;
* mixq dynamic int8 — the config list ``[{'op_types': ['Linear'], 'quant_types': ['weight'],
  'quant_bits': 8, 'quant_dynamic': True}]`` through ``ObserverQuantizer`` (no data), built by
  ``ModelSpeedup(config=quantizer.calibration_config())``;
* ORT quantize_dynamic — on the model's fp32 ONNX as mixq exports it (before the ONNX Runtime
  backend's own rewrites, e.g. its attention fusion), ORT's defaults (s8 weights, every op type it knows);
* mixq static int8 — ``ObserverQuantizer`` with the plain config (weights of Linear, and of
  Conv2d on ViT, 8 bits; the backend places the activations), calibrated on 4 batches;
* ORT quantize_static — QDQ, u8 activations, per-channel s8 weights, MinMax over the same 4 batches.

Columns: best-round median latency (each engine in its own process, round-robin, thread-pool
spinning off; mixq engines timed through ``engine.inference`` on the saved engine file, copies
and validation included); time relative to ORT's counterpart (<= 1.0 is as fast or faster);
speedup over mixq's fp32 engine; cosine of the logits to the PyTorch model's fp32 logits on 32
held-out samples (flat, and the per-sample median); configured layers running the precision
asked for (precision report); and integer shares of the multiply-accumulates, counted on the
graph ONNX Runtime runs (its optimized model, op types of the kernels): of the Linear layers
(MatMul/Gemm nodes reading a stored weight), of every layer with weights (the patch-embedding
convolution too) and of all of them (attention's products of two activations too), the last
two beside the precision report summary's ``weight_mac_share`` / ``integer_mac_share``.

    python3 benchmarks/transformers.py [--rounds 3] [--threads 2] [--models bert vit]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
# this file's name shadows the Hugging Face package: import that before benchmarks/ is searched
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
try:
    import transformers
except ImportError:
    sys.exit("this benchmark needs Hugging Face transformers: pip install transformers")
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.append(_HERE)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

import ort_baseline as ob  # noqa: E402
from mixq.quantizers import ObserverQuantizer  # noqa: E402
from mixq.speedup import ModelSpeedup  # noqa: E402
from mixq.speedup.precision_report import layer_rows, summary_row  # noqa: E402
from mixq.table import format_table  # noqa: E402
from mixq.zoo.images import image_source, sample_images  # noqa: E402

Batch = Dict[str, torch.Tensor]
BATCH, SEQ, IMAGE = 8, 128, 224
CALIB_BATCHES, EVAL_BATCHES = 4, 4
PAD, CLS, SEP, FIRST_WORDPIECE = 0, 101, 102, 1000  # bert-base-uncased's vocabulary layout
DYNAMIC_CONFIG = [{"op_types": ["Linear"], "quant_types": ["weight"], "quant_bits": 8, "quant_dynamic": True}]
MIXQ_FP32, MIXQ_DYN, ORT_DYN, MIXQ_STATIC, ORT_STATIC = (
    "mixq fp32", "mixq dynamic int8", "ORT quantize_dynamic", "mixq static int8", "ORT quantize_static")
COUNTERPART = {MIXQ_DYN: ORT_DYN, MIXQ_STATIC: ORT_STATIC}


@dataclass
class Case:
    """One model with its data: calibration batches, held-out batches (the first one is timed)."""

    name: str
    model: torch.nn.Module
    static_config: List[Dict[str, Any]]
    calib: List[Batch]
    held_out: List[Batch]


@dataclass
class Row:
    """One engine of a case: how to time it, its logits on the held-out batches, its kernels."""

    label: str
    timed: ob.TimedEngine
    logits: np.ndarray
    optimized: onnx.ModelProto
    report: Optional[List[Dict[str, Any]]] = None
    ms: float = float("inf")
    shares: Dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------

def token_batch(gen: torch.Generator, vocab: int, batch: int = BATCH, seq: int = SEQ) -> Batch:
    """Token ids as a tokenizer pads them: [CLS] word pieces [SEP], then [PAD]s; mask 1 on the text."""
    lengths = torch.randint(int(0.4 * seq), seq + 1, (batch,), generator=gen)
    ids = torch.randint(FIRST_WORDPIECE, vocab, (batch, seq), generator=gen)
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask + PAD * (1 - mask), "attention_mask": mask}


def bert_case() -> Case:
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [token_batch(gen, config.vocab_size) for _ in range(CALIB_BATCHES + EVAL_BATCHES)]
    return Case("BERT", model, [{"op_types": ["Linear"], "quant_types": ["weight"], "quant_bits": 8}],
                batches[:CALIB_BATCHES], batches[CALIB_BATCHES:])


def vit_case() -> Case:
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                    intermediate_size=768, image_size=IMAGE)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    images = sample_images((CALIB_BATCHES + EVAL_BATCHES) * BATCH, IMAGE).split(BATCH)
    batches = [{"pixel_values": x} for x in images]
    return Case("ViT", model, [{"op_types": ["Conv2d", "Linear"], "quant_types": ["weight"], "quant_bits": 8}],
                batches[:CALIB_BATCHES], batches[CALIB_BATCHES:])


CASES: Dict[str, Callable[[], Case]] = {"bert": bert_case, "vit": vit_case}


def numpy_feeds(batch: Batch) -> Dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

def calibrated(model: torch.nn.Module, config_list: List[Dict[str, Any]], batches: List[Batch],
               example: Batch) -> Dict[str, Any]:
    """The calibration config ``ObserverQuantizer`` exports for ``config_list`` after forwards on
    ``batches`` (none for dynamic configs), on a copy of ``model``."""
    quantizer = ObserverQuantizer(copy.deepcopy(model), config_list, dummy_input=example)
    with torch.no_grad():
        for batch in batches:
            quantizer.bound_model(**batch)
    quantizer.compress()
    return quantizer.calibration_config()


def mixq_engine(case: Case, config: Optional[Dict[str, Any]], threads: int, onnx_path: Optional[str] = None
                ) -> ModelSpeedup:
    return ModelSpeedup(case.model, dummy_input=case.held_out[0], config=config, num_threads=threads,
                        onnx_path=onnx_path).compress()


def mixq_row(label: str, case: Case, engine: ModelSpeedup, tmp: str) -> Row:
    path = os.path.join(tmp, f"{case.name}-{label.replace(' ', '-')}.mixq")
    engine.export_quantized_model(path)
    logits = np.concatenate([engine.inference(b)[0].logits.numpy() for b in case.held_out])
    return Row(label, ob.TimedEngine("mixq", path), logits, engine._engine.optimized_model, engine.precision_report())


def ort_row(label: str, case: Case, model: bytes, output: str, tmp: str, threads: int) -> Row:
    path = os.path.join(tmp, f"{case.name}-{label.replace(' ', '-')}.onnx")
    with open(path, "wb") as fh:
        fh.write(model)
    session = ob.make_session(model, threads)
    logits = np.concatenate([session.run([output], numpy_feeds(b))[0] for b in case.held_out])
    return Row(label, ob.TimedEngine("onnx", path), logits, ob.optimized_model(model, threads))


def build_rows(case: Case, tmp: str, threads: int) -> List[Row]:
    exported = os.path.join(tmp, f"{case.name}-exported.onnx")
    fp32 = mixq_engine(case, None, threads, onnx_path=exported)
    with open(exported, "rb") as fh:  # the model's fp32 ONNX as exported, before any backend rewrite
        graph = fh.read()             # (mixq's attention fusion included): what ORT's quantizers start from
    output = fp32.output_names[list(fp32.io.output_structure.keys).index("logits")]
    dynamic = mixq_engine(case, calibrated(case.model, DYNAMIC_CONFIG, [], case.held_out[0]), threads)
    static = mixq_engine(case, calibrated(case.model, case.static_config, case.calib, case.calib[0]), threads)
    with np.errstate(all="ignore"):  # ORT's MinMax warns dividing by a constant tensor's zero range
        ort_static = ob.ort_quantize_static(graph, [numpy_feeds(b) for b in case.calib])
    return [mixq_row(MIXQ_FP32, case, fp32, tmp), mixq_row(MIXQ_DYN, case, dynamic, tmp),
            ort_row(ORT_DYN, case, ob.ort_quantize_dynamic(graph), output, tmp, threads),
            mixq_row(MIXQ_STATIC, case, static, tmp), ort_row(ORT_STATIC, case, ort_static, output, tmp, threads)]


# ---------------------------------------------------------------------------------------------
# Kernels of the graph ONNX Runtime runs
# ---------------------------------------------------------------------------------------------

def integer_shares(optimized: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Integer shares of the multiply-accumulates in ``optimized``: of the Linear layers
    ('linear': MatMul/Gemm-like nodes whose weight operand is computed from stored tensors only,
    an initializer, its DequantizeLinear or Transpose), of every layer with a stored weight
    ('weight': convolutions too) and of all of them ('all': attention's products of two
    activations too)."""
    constant = {i.name for i in optimized.graph.initializer}
    for node in optimized.graph.node:  # topological order
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    macs = ob.mac_count(optimized, feeds=feeds)
    totals = {key: [0, 0] for key in ("linear", "weight", "all")}
    for node in optimized.graph.node:
        name = node.name or node.output[0]
        if name not in macs:
            continue
        index, kind = ob.MAC_OPS[node.op_type]
        keys = ["all"]
        if node.input[index] in constant:
            keys += ["weight", "linear"] if kind in ("matmul", "gemm") else ["weight"]
        for key in keys:
            totals[key][0] += macs[name] * (node.op_type in ob.INTEGER_MAC_OPS)
            totals[key][1] += macs[name]
    return {key: i / t if t else 0.0 for key, (i, t) in totals.items()}


# ---------------------------------------------------------------------------------------------
# Timing: each engine in its own process, round-robin, best round
# ---------------------------------------------------------------------------------------------

def time_rows(rows: List[Row], feeds: Dict[str, np.ndarray], rounds: int, threads: int, runs: int = 20,
              warmup: int = 5, min_seconds: float = 1.0) -> None:
    """Best-round median latency of every row, each engine in a fresh process per round
    (``ort_baseline.time_round_robin``)."""
    best = ob.time_round_robin({row.label: row.timed for row in rows}, feeds, rounds, runs, warmup, threads,
                               min_seconds)
    for row in rows:
        row.ms = 1e3 * best[row.label]


# ---------------------------------------------------------------------------------------------
# Table and targets
# ---------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """``lscpu``'s model name."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def cosines(logits: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    return ob.cosine(logits, reference), float(np.median(ob.per_image_cosine(logits, reference)))


def table_rows(name: str, rows: List[Row], reference: np.ndarray) -> List[List[str]]:
    by_label = {r.label: r for r in rows}
    fp32_ms = by_label[MIXQ_FP32].ms
    out = []
    for row in rows:
        counterpart = by_label.get(COUNTERPART.get(row.label, ""))
        flat, median = cosines(row.logits, reference)
        if row.report is not None:
            layers = layer_rows(row.report)
            as_asked = f"{sum(r['actual'] == r['requested'] for r in layers)}/{len(layers)}" if layers else "-"
            summary = summary_row(row.report)
            weight = f"{summary['weight_mac_share']:.1%} / {row.shares['weight']:.1%}"
            every = f"{summary['integer_mac_share']:.1%} / {row.shares['all']:.1%}"
        else:
            as_asked = "-"
            weight, every = f"- / {row.shares['weight']:.1%}", f"- / {row.shares['all']:.1%}"
        out.append([name, row.label, f"{row.ms:.2f}", f"{row.ms / counterpart.ms:.2f}x" if counterpart else "-",
                    f"{fp32_ms / row.ms:.2f}x", f"{flat:.5f}", f"{median:.5f}", as_asked,
                    f"{row.shares['linear']:.1%}", weight, every])
    return out


def targets(results: Dict[str, List[Row]], references: Dict[str, np.ndarray]) -> List[Tuple[bool, str]]:
    checks = []
    for name, rows in results.items():
        r = {row.label: row for row in rows}
        cos = {label: cosines(row.logits, references[name])[0] for label, row in r.items()}
        ratio = r[MIXQ_DYN].ms / r[ORT_DYN].ms
        checks.append((ratio <= 1.0, f"{name}: dynamic int8 {ratio:.2f}x ORT quantize_dynamic (<= 1.0x)"))
        if name == "BERT":
            speedup = r[MIXQ_FP32].ms / r[MIXQ_DYN].ms
            checks.append((speedup >= 1.5, f"{name}: dynamic int8 {speedup:.2f}x faster than mixq fp32 (>= 1.5x)"))
        ratio = r[MIXQ_STATIC].ms / r[ORT_STATIC].ms
        checks.append((ratio <= 1.0, f"{name}: static int8 {ratio:.2f}x ORT quantize_static (<= 1.0x)"))
        checks.append((cos[MIXQ_DYN] >= 0.99, f"{name}: dynamic int8 logits cosine {cos[MIXQ_DYN]:.5f} (>= 0.99)"))
        for mine, theirs in COUNTERPART.items():
            checks.append((cos[mine] >= cos[theirs] - 0.005, f"{name}: {mine} cosine {cos[mine]:.5f} >= "
                           f"{theirs}'s {cos[theirs]:.5f} - 0.005"))
        for label in COUNTERPART:
            layers = layer_rows(r[label].report)
            as_asked = sum(row["actual"] == row["requested"] for row in layers)
            linear = r[label].shares["linear"]
            checks.append((as_asked == len(layers) and linear >= 0.95,
                           f"{name}: {label}: {as_asked}/{len(layers)} configured layers run as asked (report), "
                           f"{linear:.1%} of Linear MACs in integer kernels (optimized graph, >= 95%)"))
            summary = summary_row(r[label].report)
            for key, scope in (("weight_mac_share", "weight"), ("integer_mac_share", "all")):
                report, graph = summary[key], r[label].shares[scope]
                checks.append((abs(report - graph) <= 0.01, f"{name}: {label}: integer share of {scope} MACs: "
                               f"report summary {report:.1%}, optimized graph {graph:.1%} (agree within 1 point)"))
    return checks


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # HF's masking code makes the tracer warn; the export check compares the graph with the model anyway
    logging.getLogger("mixq.placement.export_check").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}; {args.threads} threads; batch {BATCH} (BERT: sequence {SEQ}; ViT: {IMAGE}x{IMAGE}, "
          f"{image_source()} images); each engine in its own process, best of {args.rounds} round-robin rounds")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers "
          f"{transformers.__version__}; cosines on {EVAL_BATCHES * BATCH} held-out samples, static int8 "
          f"calibrated on {CALIB_BATCHES} batches")
    results: Dict[str, List[Row]] = {}
    references: Dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="mixq-hf-") as tmp:
        for key in args.models:
            case = CASES[key]()
            with torch.no_grad():
                references[case.name] = np.concatenate([case.model(**b).logits.numpy() for b in case.held_out])
            rows = build_rows(case, tmp, args.threads)
            feeds = numpy_feeds(case.held_out[0])
            for row in rows:
                row.shares = integer_shares(row.optimized, feeds)
            time_rows(rows, feeds, args.rounds, args.threads, args.runs, args.warmup, args.min_seconds)
            results[case.name] = rows
    table = [line for name, rows in results.items() for line in table_rows(name, rows, references[name])]
    print(format_table(["model", "engine", "ms/batch", "vs ORT", "vs mixq fp32", "cos", "cos median",
                        "layers as asked", "int Linear MACs (graph)",
                        "int weight MACs (report / graph)", "int all MACs (report / graph)"],
                       table))
    for ok, text in targets(results, references):
        print(f"[{'ok' if ok else 'MISS'}] {text}")


if __name__ == "__main__":
    main()
