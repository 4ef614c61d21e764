"""The two speedup examples, end to end in --quick mode, checked through their results.json."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK_TOLERANCE = {"mnist": 1.0, "cifar": 6.0}  # points of accuracy int8 may lose vs fp32 in a --quick run


def run_example(script, out_dir, *extra):
    cmd = [sys.executable, str(ROOT / "examples" / script), "--quick", "--no-download", "--backend", "onnxruntime",
           "--output-dir", str(out_dir), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out_dir / "results.json").read_text())


def check_results(results, name):
    rows = results["rows"]
    assert {(r["strategy"], r["path"]) for r in rows} == {(s, p) for s in ("fp32", "mixed", "int8") for p in ("qat", "ptq")}
    by = {(r["strategy"], r["path"]): r for r in rows}
    fp32 = by[("fp32", "qat")]
    for path in ("qat", "ptq"):
        int8 = by[("int8", path)]
        assert int8["accuracy"] >= fp32["accuracy"] - QUICK_TOLERANCE[name], (path, int8["accuracy"], fp32["accuracy"])
        assert int8["latency_ms"] < fp32["latency_ms"], (path, int8["latency_ms"], fp32["latency_ms"])
        assert int8["avg_bits"] == 8.0 and 8.0 < by[("mixed", path)]["avg_bits"] < 32.0
        assert int8["onnx_bytes"] < 0.3 * fp32["onnx_bytes"]
        assert all(p == "int8" for p in int8["precision"].values()), int8["precision"]
    for row in rows:
        for key in ("strategy", "path", "avg_bits", "latency_ms", "speedup", "accuracy", "onnx_bytes"):
            assert key in row


def test_mnist_example_quick_with_vendored_fallback(tmp_path):
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    result, results = run_example("mnist_speedup.py", tmp_path / "out", "--data-dir", str(empty))
    assert "falling back to the copy vendored in examples/data" in result.stdout
    check_results(results, "mnist")
    assert (tmp_path / "out" / "mnist_int8_qat_calibration.json").exists()
    assert "speedup" in result.stdout and "precision that ran" in result.stdout


def test_cifar_example_quick(tmp_path, cifar_root):
    result, results = run_example("cifar_speedup.py", tmp_path / "out", "--data-dir", cifar_root)
    check_results(results, "cifar")


def test_cifar_example_without_data_says_so(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "cifar_speedup.py"), "--quick", "--no-download",
           "--data-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cifar-10-batches-py" in result.stderr and "Traceback" not in result.stderr
