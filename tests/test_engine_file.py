"""The saved-engine container: round trip, atomic writes, and every way reading can fail."""
from __future__ import annotations

import json
import os
import zipfile

import pytest

from mixq.compressor import save_calibration_config
from mixq.speedup import EngineFormatError
from mixq.speedup.engine_file import FORMAT_NAME, FORMAT_VERSION, read_engine_file, write_engine_file

META = {"backend": "onnxruntime", "backend_version": "1.0", "input_names": ["input"], "output_names": ["output"],
        "input_shapes": [[1, 3, 8, 8]], "batchsize": 1, "calibration": {"conv": {"weight_bits": 16}}}
PAYLOAD = bytes(range(256)) * 4


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def meta_json(**changes):
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **META, "payload_size": len(PAYLOAD),
                **changes}
    return json.dumps({k: v for k, v in document.items() if v is not None})


def test_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "engine.mixq")  # the folder is created
    write_engine_file(path, META, PAYLOAD)
    meta, payload = read_engine_file(path, backend="onnxruntime", backend_version="1.0")
    assert payload == PAYLOAD
    assert meta == {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **META, "payload_size": len(PAYLOAD)}
    assert os.listdir(tmp_path / "sub") == ["engine.mixq"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "engine.mixq")
    write_engine_file(path, META, PAYLOAD)
    before = open(path, "rb").read()
    with pytest.raises(TypeError):
        write_engine_file(path, META, object())  # not bytes: fails inside the zip writer
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["engine.mixq"]


@pytest.mark.parametrize("members, fragment", [
    ({"payload.bin": PAYLOAD}, "missing meta.json or payload.bin"),
    ({"meta.json": meta_json()}, "missing meta.json or payload.bin"),
    ({"meta.json": "{not json", "payload.bin": PAYLOAD}, "not a readable mixq engine file"),
    ({"meta.json": b"\xff\xfe", "payload.bin": PAYLOAD}, "not a readable mixq engine file"),
    ({"meta.json": "[1, 2]", "payload.bin": PAYLOAD}, 'lacks "format": "mixq-engine"'),
    ({"meta.json": meta_json(format="other"), "payload.bin": PAYLOAD}, 'lacks "format": "mixq-engine"'),
    ({"meta.json": meta_json(format_version=FORMAT_VERSION + 1), "payload.bin": PAYLOAD}, f"engine format version {FORMAT_VERSION + 1}"),
    ({"meta.json": meta_json(input_shapes=None), "payload.bin": PAYLOAD}, "lacks 'input_shapes'"),
    ({"meta.json": meta_json(batchsize=None), "payload.bin": PAYLOAD}, "lacks 'batchsize'"),
    ({"meta.json": meta_json(backend=None), "payload.bin": PAYLOAD}, "lacks 'backend'"),
])
def test_malformed_containers(tmp_path, members, fragment):
    with pytest.raises(EngineFormatError, match=fragment.replace("(", r"\(")):
        read_engine_file(write_zip(tmp_path / "bad.mixq", members))


def test_not_a_zip_and_truncated(tmp_path):
    garbage = tmp_path / "garbage.mixq"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(EngineFormatError, match="truncated or corrupt"):
        read_engine_file(str(garbage))
    path = str(tmp_path / "engine.mixq")
    write_engine_file(path, META, PAYLOAD)
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.mixq"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineFormatError, match="truncated or corrupt"):
        read_engine_file(str(truncated))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no engine file"):
        read_engine_file(str(tmp_path / "absent.mixq"))
    with pytest.raises(FileNotFoundError, match="no engine file"):
        read_engine_file(str(tmp_path))  # a folder is not an engine file


def test_a_calibration_file_is_named_as_such(tmp_path):
    path = str(tmp_path / "calibration.json")
    save_calibration_config({"fc": {"type": "Linear", "weight_bits": 16}}, path)
    with pytest.raises(EngineFormatError, match="is a mixq calibration file, not an engine"):
        read_engine_file(path)
    other = tmp_path / "other.json"
    other.write_text('{"format": "something-else"}')
    with pytest.raises(EngineFormatError, match="truncated or corrupt"):
        read_engine_file(str(other))


def test_backend_and_version_mismatch(tmp_path):
    path = str(tmp_path / "engine.mixq")
    write_engine_file(path, META, PAYLOAD)
    with pytest.raises(EngineFormatError, match="holds a 'onnxruntime' engine, not a 'tensorrt' one"):
        read_engine_file(path, backend="tensorrt")
    with pytest.raises(EngineFormatError, match="built with onnxruntime 1.0, this is 2.0"):
        read_engine_file(path, backend_version="2.0")
