"""Issue #13, items 6-10 and 14-16: an engine file, however crafted, is a one-line
EngineFormatError or a working engine; reading it never takes more than twice its payload's
declared size; written files honour the umask and killed writers leave no temp files behind.

Files are crafted from a real engine (a small model built here): one field or member changed.
Peak memory is measured in a fresh interpreter (peak RSS while reading over RSS before).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import zipfile

import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from mixq.atomic_io import atomic_output, atomic_write
from mixq.cli import main
from mixq.compressor import save_calibration_config
from mixq.speedup import EngineFormatError, ModelSpeedup
from mixq.speedup.engine_file import META, PAYLOAD, read_engine_file, write_engine_file
from mixq.speedup.threads import resolve_threads

MB = 2 ** 20


@pytest.fixture(scope="module")
def engine_file(tmp_path_factory):
    """(path, meta, payload) of a real ONNX Runtime engine of a small conv net."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    path = tmp_path_factory.mktemp("engine") / "small.mixq"
    ModelSpeedup(model, (4, 1, 8, 8)).compress().export_quantized_model(str(path))
    with zipfile.ZipFile(path) as zf:
        return path, json.loads(zf.read(META)), zf.read(PAYLOAD)


def craft(path, meta, payload, **changes):
    """An engine zip holding ``meta`` with ``changes`` (None deletes a key) and ``payload``."""
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(META, json.dumps(meta))
        zf.writestr(PAYLOAD, payload)
    return str(path)


def peak_mb(code: str) -> float:
    """Growth of the peak RSS (MB) while ``code`` runs in a fresh interpreter, over its RSS after
    the imports (Linux resets the peak through /proc/self/clear_refs)."""
    script = textwrap.dedent("""
        import sys
        import mixq.speedup, mixq.speedup.backends.onnxruntime
        from mixq.speedup import EngineFormatError, ModelSpeedup
        from mixq.speedup.engine_file import read_engine_file

        def status(key):
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # peak RSS := current RSS
        base = status("VmRSS")
        try:
        {code}
        except EngineFormatError as exc:
            print("refused:", exc, file=sys.stderr)
        print((status("VmHWM") - base) / 1024)
    """).format(code=textwrap.indent(code, "    "))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.split()[-1])


def _bomb(path, meta, size: int, declared: int) -> str:
    """A zip whose payload inflates to ``size`` zero bytes (a few hundred KB on disk)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(META, json.dumps({**meta, "payload_size": declared}))
        with zf.open(PAYLOAD, "w", force_zip64=True) as fh:
            chunk = bytes(MB)
            for _ in range(size // MB):
                fh.write(chunk)
    return str(path)


# -- item 6: a payload that inflates far beyond its file ---------------------------------------

@pytest.mark.slow  # subprocesses or a gigabyte-sized payload: seconds each
def test_zip_bomb_is_refused_before_inflating(engine_file, tmp_path):
    _, meta, _ = engine_file
    path = _bomb(tmp_path / "bomb.mixq", meta, 256 * MB, declared=4096)
    assert os.path.getsize(path) < 2 * MB
    with pytest.raises(EngineFormatError, match="inflates to 268435456 bytes but meta.json records 4096"):
        read_engine_file(path)
    assert peak_mb(f"ModelSpeedup.load_quantized_model({path!r})") < 16


@pytest.mark.slow  # subprocesses or a gigabyte-sized payload: seconds each
def test_a_consistent_bomb_costs_at_most_twice_its_declared_size(engine_file, tmp_path):
    _, meta, _ = engine_file
    path = _bomb(tmp_path / "bomb.mixq", meta, 128 * MB, declared=128 * MB)
    with pytest.raises(EngineFormatError, match="not an ONNX model"):
        ModelSpeedup.load_quantized_model(path)
    assert peak_mb(f"ModelSpeedup.load_quantized_model({path!r})") < 2 * 128 + 16


@pytest.mark.parametrize("changes, fragment", [
    ({"payload_size": 5 * 2 ** 30}, "payload_size"),
    ({"payload_size": None}, "lacks 'payload_size'"),
])
def test_payload_size_is_bounded_and_required(engine_file, tmp_path, changes, fragment):
    path, meta, payload = engine_file
    with pytest.raises(EngineFormatError, match=fragment):
        read_engine_file(craft(tmp_path / "e.mixq", meta, payload, **changes))


def test_huge_meta_and_many_members_are_refused_unread(engine_file, tmp_path):
    _, meta, payload = engine_file
    big = tmp_path / "meta.mixq"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(META, json.dumps(meta)[:-1] + ', "pad": "' + " " * (40 * MB) + '"}')
        zf.writestr(PAYLOAD, payload)
    with pytest.raises(EngineFormatError, match="more than mixq metadata can have"):
        read_engine_file(str(big))
    many = tmp_path / "many.mixq"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(200):
            zf.writestr(f"m{i}", b"")
    with pytest.raises(EngineFormatError, match="a zip of 200 entries"):
        read_engine_file(str(many))


# -- items 7 and 10: every meta field's type and range ------------------------------------------

BAD_FIELDS = [
    ({"batchsize": 10 ** 12}, "'batchsize'"), ({"batchsize": 0}, "'batchsize'"), ({"batchsize": -1}, "'batchsize'"),
    ({"batchsize": "abc"}, "'batchsize'"), ({"batchsize": True}, "'batchsize'"), ({"batchsize": 2.0}, "'batchsize'"),
    ({"batchsize": None}, "lacks 'batchsize'"),
    ({"input_shapes": None}, "lacks 'input_shapes'"), ({"input_shapes": [[0, 1, 8, 8]]}, "'input_shapes'"),
    ({"input_shapes": [["a", 1, 8, 8]]}, "'input_shapes'"), ({"input_shapes": [[1] * 9]}, "'input_shapes'"),
    ({"input_shapes": [[4, 1, 8, 8], [4, 1, 8, 8]]}, "disagree on the number of inputs"),
    ({"input_names": []}, "'input_names'"), ({"output_names": "output"}, "'output_names'"),
    ({"precision_report": [1]}, "'precision_report'"),
    ({"precision_report": [{"layer": 1, "requested": "int8", "actual": "int8"}]}, "'precision_report'"),
    ({"precision_report": [{"layer": "a", "requested": "int8"}]}, "'precision_report'"),
    ({"precision_report": [{"layer": "a", "requested": "", "actual": "", "kind": "x"}]}, "'precision_report'"),
    ({"layer_nodes": [1, 2]}, "'layer_nodes'"), ({"layer_nodes": {"a": [1]}}, "'layer_nodes'"),
    ({"calibration": [1]}, "'calibration'"), ({"calibration": {"conv": {"weight_bits": "x"}}}, "calibration is invalid"),
    ({"backend": "tvm"}, "'backend'"), ({"backend_version": 1}, "'backend_version'"),
    ({"io": {"inputs": "x"}}, "'io'"), ({"format_version": True}, "format version True"),
    ({"format_version": 1}, "format version 1"),
]


@pytest.mark.parametrize("changes, fragment", BAD_FIELDS, ids=[str(i) for i in range(len(BAD_FIELDS))])
def test_meta_fields_are_checked(engine_file, tmp_path, changes, fragment):
    _, meta, payload = engine_file
    path = craft(tmp_path / "e.mixq", meta, payload, **changes)
    with pytest.raises(EngineFormatError, match=fragment) as info:
        ModelSpeedup.load_quantized_model(path)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
    assert main(["inspect", path]) == 2  # mixq inspect: one line, no traceback


@pytest.mark.parametrize("io_change, fragment", [
    (lambda io: io.update(output_names=["a", "b"]), "returns 1 outputs, meta.json names 2"),
    (lambda io: io["inputs"][0].update(shape=[3, 8, 8]), "cannot load its payload"),
    (lambda io: io["inputs"][0].update(dtype="complex64"), "io is invalid"),
])
def test_io_that_does_not_fit_the_payload_is_refused_at_load(engine_file, tmp_path, io_change, fragment):
    _, meta, payload = engine_file
    io = json.loads(json.dumps(meta["io"]))
    io_change(io)
    with pytest.raises(EngineFormatError, match=fragment):
        ModelSpeedup.load_quantized_model(craft(tmp_path / "e.mixq", meta, payload, io=io))


def test_deeply_nested_meta_is_an_engine_format_error(engine_file, tmp_path):
    _, meta, payload = engine_file
    deep = tmp_path / "deep.mixq"
    with zipfile.ZipFile(deep, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(META, json.dumps(meta)[:-1] + ', "x": ' + "[" * 200000 + "]" * 200000 + "}")
        zf.writestr(PAYLOAD, payload)
    with pytest.raises(EngineFormatError, match="nested too deeply"):
        read_engine_file(str(deep))


@pytest.mark.slow  # subprocesses or a gigabyte-sized payload: seconds each
def test_a_large_batchsize_costs_no_memory_at_load(engine_file, tmp_path):
    _, meta, payload = engine_file
    path = craft(tmp_path / "e.mixq", meta, payload, batchsize=200000)
    code = f"e = ModelSpeedup.load_quantized_model({path!r}); assert e.batchsize == 200000"
    assert peak_mb(code) < 64  # the warm-up runs one sample, not batchsize
    x = torch.randn(3, 1, 8, 8)
    engine = ModelSpeedup.load_quantized_model(path)
    torch.testing.assert_close(engine.inference(x)[0], ModelSpeedup.load_quantized_model(engine_file[0]).inference(x)[0])


# -- item 8: external data ------------------------------------------------------------------------

def _onnx_with_external_weight() -> bytes:
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[8])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    graph = helper.make_graph([helper.make_node("Add", ["input", "W"], ["output"], name="add")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_external_data_is_refused_before_any_file_is_opened(engine_file, tmp_path, monkeypatch):
    _, meta, _ = engine_file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(bytes(32))  # what ONNX Runtime would read from the working dir
    payload = _onnx_with_external_weight()
    path = craft(tmp_path / "e.mixq", meta, payload, payload_size=len(payload), input_shapes=[[4, 8]], io=None)
    with pytest.raises(EngineFormatError, match="initializer 'W' of its ONNX payload points to external data"):
        ModelSpeedup.load_quantized_model(path)


# -- item 9: payloads the backend rejects -----------------------------------------------------------

def _custom_domain() -> bytes:
    graph = helper.make_graph([helper.make_node("Steal", ["input"], ["output"], domain="evil.ops", name="s")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("evil.ops", 1)]).SerializeToString()


PAYLOADS = {"empty": b"", "junk": bytes(range(256)) * 8, "pickle": pickle.dumps({"a": [1, 2, 3]}),
            "custom-domain": _custom_domain()}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_bad_payloads_are_engine_format_errors_naming_the_file(engine_file, tmp_path, kind):
    _, meta, _ = engine_file
    payload = PAYLOADS[kind]
    path = craft(tmp_path / f"{kind}.mixq", meta, payload, payload_size=len(payload))
    with pytest.raises(EngineFormatError, match="rebuild the engine") as info:
        ModelSpeedup.load_quantized_model(path)
    assert path in str(info.value) and len(str(info.value).splitlines()) == 1


@pytest.mark.slow  # subprocesses or a gigabyte-sized payload: seconds each
def test_mixq_bench_on_a_bad_payload_is_one_line(engine_file, tmp_path):
    _, meta, _ = engine_file
    payload = PAYLOADS["custom-domain"]
    path = craft(tmp_path / "custom.mixq", meta, payload, payload_size=len(payload))
    result = subprocess.run([sys.executable, "-m", "mixq.cli", "bench", path, "--batch-size", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and path in result.stderr


# -- items 13 and 16: command-line and argument ranges ----------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "1000000000"], "needs"),
    (["--batch-size", "2", "--warmup", "-5"], "--warmup"),
    (["--batch-size", "2", "--runs", "0"], "must be positive"),
])
def test_bench_arguments_are_checked(engine_file, capsys, args, fragment):
    assert main(["bench", str(engine_file[0]), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("threads", [-3, 0, True, 2.5, "2", 10 ** 6])
def test_num_threads_is_checked(engine_file, threads):
    with pytest.raises(ValueError, match="num_threads must be an int"):
        ModelSpeedup.load_quantized_model(str(engine_file[0]), num_threads=threads)


def test_default_threads_are_the_usable_cores():
    assert resolve_threads(None) == len(os.sched_getaffinity(0)) and resolve_threads(3) == 3


# -- items 14 and 15: file modes and temp files -----------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(engine_file, tmp_path, umask, mode):
    _, meta, payload = engine_file
    old = os.umask(umask)
    try:
        write_engine_file(str(tmp_path / "e.mixq"), meta, payload)
        save_calibration_config({"fc": {"type": "Linear", "weight_bits": 16}}, str(tmp_path / "c.json"))
        atomic_write(tmp_path / "w.bin", b"x")
    finally:
        os.umask(old)
    for name in ("e.mixq", "c.json", "w.bin"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


KILLED_WRITER = """
import os, signal, sys
from mixq.atomic_io import atomic_output
with atomic_output(sys.argv[1]) as fh:
    fh.write(b"partial")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow  # subprocesses or a gigabyte-sized payload: seconds each
def test_temp_files_of_killed_writers_are_removed_by_the_next_write(engine_file, tmp_path):
    _, meta, payload = engine_file
    target = tmp_path / "e.mixq"
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], timeout=120)
        assert result.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(tmp_path) if n != "e.mixq"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".e.mixq.mixq-")  # each write removed the one before
    live = tmp_path / leftovers[0].replace(leftovers[0].split("-pid")[1].split("-")[0], str(os.getpid()))
    live.write_bytes(b"a writer that still runs")
    other_host = tmp_path / ".e.mixq.mixq-elsewhere-pid1-abcd.tmp"
    other_host.write_bytes(b"another machine's writer")
    write_engine_file(str(target), meta, payload)
    assert sorted(os.listdir(tmp_path)) == sorted(["e.mixq", live.name, other_host.name])
    read_engine_file(str(target))


def test_two_writers_on_one_path_leave_one_whole_file(engine_file, tmp_path):
    _, meta, payload = engine_file
    target = str(tmp_path / "e.mixq")
    errors = []

    def write(n: int) -> None:
        try:
            for _ in range(10):
                write_engine_file(target, {**meta, "mixq_version": str(n)}, payload)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and os.listdir(tmp_path) == ["e.mixq"]
    assert read_engine_file(target)[1] == payload


def test_atomic_output_removes_its_temp_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "x.bin") as fh:
            fh.write(b"half")
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []


def test_onnx_payload_of_a_real_engine_passes(engine_file):
    _, _, payload = engine_file
    assert onnx.load_from_string(payload).graph.node
