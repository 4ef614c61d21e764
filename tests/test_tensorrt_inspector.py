"""Engine-inspector parsing on layer information TensorRT itself printed (tests/data/tensorrt,
sources in its README), plus the TensorRT 10/11 metadata forms the ONNX parser writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixq.speedup.backends.tensorrt_inspector import (UNKNOWN, layer_onnx_nodes, layer_precision, load_layers,
                                                      precisions_from_inspector_json, with_unmapped)

DATA = Path(__file__).parent / "data" / "tensorrt"
US, RS = "\x1f", "\x1e"


def _text(name: str) -> str:
    return (DATA / name).read_text()


def test_recorded_qat_mobilenet_int8_layers():
    got = precisions_from_inspector_json(_text("trex_mobilenet_v2_residuals_qat.json"))
    for node in ("Conv_9", "Clip_13", "QuantizeLinear_7", "Conv_23", "Clip_27", "Conv_121", "Add_123",
                 "Gemm_764"):
        assert got[node] == "int8", node
    assert got["GlobalAveragePool_747"] == "fp16"
    assert "QuantizeLinear_2" not in got  # recorded as a Reformat layer: no compute precision
    assert not any(name.startswith("PWN") or name.endswith(")") and "(" not in name for name in got)


def test_recorded_fp16_resnet_layers():
    got = precisions_from_inspector_json(_text("trex_resnet_fp16.json"))
    assert {got[n] for n in ("Conv_0", "Relu_1", "Conv_3", "Relu_4", "Conv_5", "Add_6", "Relu_7", "Gemm_48")} \
        == {"fp16"}
    assert got["MaxPool_2"] == "fp16"
    assert not any("Reformatting" in name for name in got)


def test_recorded_myelin_layers_weights_as_inputs():
    """Torch-TensorRT's recorded explicit-typing build: fp32 linear, fp16 linear (its weight
    ``__mye127_dconst`` and its input Half), fp32 linear; Myelin names map no ONNX node."""
    layers = load_layers(_text("torch_tensorrt_explicit_typing.json"))
    assert [layer_precision(layer) for layer in layers] == ["fp32", "fp16", "fp32"]
    assert [layer_onnx_nodes(layer) for layer in layers] == [[], [], []]
    assert precisions_from_inspector_json(_text("torch_tensorrt_explicit_typing.json")) == {}


def test_fused_cast_into_myelin_gemm_reads_fp16_from_its_weights():
    """The recorded fp16 layer with its Cast fused in: it reads the fp32 activation, its weight
    input is Half. It computes in fp16 and must not read as fp32."""
    layer = load_layers(_text("torch_tensorrt_explicit_typing.json"))[1]
    layer["Inputs"][2]["Format/Datatype"] = "Float"
    assert layer_precision(layer) == "fp16"


def test_unmapped_nodes_are_unknown_never_fp32():
    got = with_unmapped(precisions_from_inspector_json(_text("torch_tensorrt_explicit_typing.json")),
                        ["/linear1/Gemm", "/linear2/Gemm"])
    assert got == {"/linear1/Gemm": UNKNOWN, "/linear2/Gemm": UNKNOWN}
    mapped = with_unmapped({"/conv/Conv": "int8"}, ["/conv/Conv", "/fc/Gemm"])
    assert mapped == {"/conv/Conv": "int8", "/fc/Gemm": UNKNOWN}


def _layer(metadata: str, datatype: str = "Int8", name: str = "__myl_fused") -> dict:
    return {"Name": name, "LayerType": "kgen", "Inputs": [{"Name": "t", "DataType": datatype}], "Metadata": metadata}


def test_local_function_metadata_is_split_on_the_bar():
    """onnx-tensorrt importerUtils.cpp processMetadata: '[ONNX Layer: <name> | Local Function: F]'."""
    meta = US.join(["[ONNX Layer: /blk/conv/Conv | Local Function: Block]", "[ONNX Layer: /blk/act/Relu]"])
    assert precisions_from_inspector_json(json.dumps({"Layers": [_layer(meta)]})) == {
        "/blk/conv/Conv": "int8", "/blk/act/Relu": "int8"}


def test_truncated_metadata_keeps_only_whole_entries():
    """Metadata over 4000 characters keeps its head and tail around ' ... ': partial entries are dropped."""
    meta = "[ONNX Layer: /a/Conv]" + US + "[ONNX Layer: /b/C ... v]" + US + "[ONNX Layer: /c/Relu]"
    assert precisions_from_inspector_json(json.dumps({"Layers": [_layer(meta)]})) == {
        "/a/Conv": "int8", "/c/Relu": "int8"}
    cut = "[ONNX Layer: /a/Conv]" + RS + "ONNX Layer: /b/Conv]" + RS + "[ONNX Layer: /c/"
    assert set(precisions_from_inspector_json(json.dumps({"Layers": [_layer(cut)]}))) == {"/a/Conv"}


def test_myelin_and_foreign_node_names():
    assert layer_onnx_nodes({"Name": "__myl_MulSum_myl0_0", "Metadata": ""}) == []
    assert layer_onnx_nodes({"Name": "{ForeignNode[/enc/Unsqueeze_3 + /enc/Unsqueeze_4.../head/Squeeze]}"}) == [
        "/enc/Unsqueeze_3", "/enc/Unsqueeze_4", "/head/Squeeze"]
    assert layer_onnx_nodes({"Name": "w + QuantizeLinear_7 + Conv_9 + PWN(PWN(Clip_13, Add_14), Relu_15)"}) == [
        "w", "QuantizeLinear_7", "Conv_9", "Clip_13", "Add_14", "Relu_15"]


@pytest.mark.parametrize("name", ["trex_mobilenet_v2_residuals_qat.json", "trex_resnet_fp16.json",
                                  "torch_tensorrt_explicit_typing.json"])
def test_fixtures_are_detailed_inspector_output(name):
    layers = load_layers(_text(name))
    assert layers and all("Inputs" in layer and "LayerType" in layer for layer in layers)
