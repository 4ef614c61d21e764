"""The two speedup examples: end to end in --quick mode (slow tier), checked through their
results.json and the kernels ONNX Runtime runs for each saved engine; and their one-line
errors (fast tier). Latency is not asserted here: speed belongs to benchmarks/."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from qdq_graphs import op_types, optimized_graph

from mixq.speedup.backends.onnxruntime import DISABLED_OPTIMIZERS
from mixq.speedup.backends.ort_precision import INTEGER_KERNELS
from mixq.speedup.engine_file import read_engine_file

ROOT = Path(__file__).resolve().parent.parent
QUICK_TOLERANCE = {"mnist": 1.0, "cifar": 6.0}  # points of accuracy int8 may lose vs fp32 in a --quick run
CONVS = {"mnist": 2, "cifar": 20}
FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def run_example(script, out_dir, *extra):
    cmd = [sys.executable, str(ROOT / "examples" / script), "--quick", "--no-download", "--backend", "onnxruntime",
           "--output-dir", str(out_dir), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out_dir / "results.json").read_text())


def kernels(engine_file: Path) -> dict:
    """Op types of the graph ONNX Runtime optimizes a saved engine into."""
    _, payload = read_engine_file(str(engine_file))
    return op_types(optimized_graph(onnx.load_from_string(payload), DISABLED_OPTIMIZERS))


def check_results(results, name, out_dir):
    rows = results["rows"]
    assert {(r["strategy"], r["path"]) for r in rows} == {(s, p) for s in ("fp32", "mixed", "int8") for p in ("qat", "ptq")}
    by = {(r["strategy"], r["path"]): r for r in rows}
    fp32 = by[("fp32", "qat")]
    fp32_ops = kernels(out_dir / f"{name}_fp32.mixq")
    assert not set(fp32_ops) & INTEGER_KERNELS and fp32_ops.get("Conv", 0) + fp32_ops.get("FusedConv", 0) == CONVS[name]
    for path in ("qat", "ptq"):
        int8 = by[("int8", path)]
        assert int8["accuracy"] >= fp32["accuracy"] - QUICK_TOLERANCE[name], (path, int8["accuracy"], fp32["accuracy"])
        assert int8["avg_bits"] == 8.0 and 8.0 < by[("mixed", path)]["avg_bits"] < 32.0
        assert int8["onnx_bytes"] < 0.3 * fp32["onnx_bytes"]
        assert all(p == "int8" for p in int8["precision"].values()), int8["precision"]
        int8_ops = kernels(out_dir / f"{name}_int8_{path}.mixq")  # every conv and linear layer runs integer kernels
        assert int8_ops["QLinearConv"] == CONVS[name] and not set(int8_ops) & FLOAT_COMPUTE, int8_ops
        mixed_ops = kernels(out_dir / f"{name}_mixed_{path}.mixq")
        assert set(mixed_ops) & INTEGER_KERNELS and set(mixed_ops) & FLOAT_COMPUTE, mixed_ops
        assert (out_dir / f"{name}_mixed_{path}_calibration.json").exists()
    for row in rows:
        for key in ("strategy", "path", "avg_bits", "latency_ms", "speedup", "accuracy", "onnx_bytes"):
            assert key in row
    assert not list(out_dir.glob("*.onnx")) and not list(out_dir.glob("*.pt"))  # only engines, calibration, results


@pytest.mark.slow
def test_mnist_example_quick_with_vendored_fallback(tmp_path):
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    result, results = run_example("mnist_speedup.py", tmp_path / "out", "--data-dir", str(empty))
    assert "falling back to the copy vendored in mixq/data" in result.stdout
    check_results(results, "mnist", tmp_path / "out")
    assert "speedup" in result.stdout and "precision that ran" in result.stdout
    for stage in ("train fp32: step", "QAT int8: step", "calibrate mixed:", "int8/ptq: engine built", "timed 5 engines"):
        assert stage in result.stdout  # progress lines also when the output is not a terminal
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install mixq[plot]" in result.stdout
    else:
        assert (tmp_path / "out" / "accuracy_vs_latency.png").exists()


@pytest.mark.slow
def test_cifar_example_quick(tmp_path, cifar_root):
    _, results = run_example("cifar_speedup.py", tmp_path / "out", "--data-dir", cifar_root)
    check_results(results, "cifar", tmp_path / "out")


def test_cifar_example_without_data_says_so(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "cifar_speedup.py"), "--quick", "--no-download",
           "--data-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cifar-10-batches-py" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_backend_is_one_line_before_any_work(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "mnist_speedup.py"), "--backend", "tensorrt",
           "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""  # nothing loaded, trained or written
    assert not (tmp_path / "out").exists()
    line, = result.stderr.strip().splitlines()
    assert "pip install mixq[tensorrt]" in line and 'pip install -e ".[tensorrt]"' in line
