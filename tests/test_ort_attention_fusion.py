"""Float attention cores run as ONNX Runtime's fused MultiHeadAttention kernel (issue #11).

Reference: the PyTorch model itself (fp32), the quantizer's simulation (dynamic int8), and the
same engine graph without the fusion. Tiny Hugging Face BERT/ViT with random weights; skipped,
saying why, without ``transformers``.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face models need `pip install transformers`")

from mixq.quantizers import ObserverQuantizer  # noqa: E402
from mixq.speedup import ModelSpeedup  # noqa: E402
from mixq.speedup.backends.ort_attention_fusion import fuse_attention  # noqa: E402
from mixq.speedup.precision_report import layer_rows  # noqa: E402

SEQ, VOCAB, LAYERS = 16, 100, 2
DYNAMIC = [{"op_types": ["Linear"], "quant_types": ["weight"], "quant_bits": 8, "quant_dynamic": True}]


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=SEQ)).eval()


def batch(lengths) -> dict:
    """Token ids and attention masks; a length of 0 is a row with every key masked."""
    gen = torch.Generator().manual_seed(1)
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(3, VOCAB, (len(lengths), SEQ), generator=gen) * mask, "attention_mask": mask}


def optimized_ops(engine: ModelSpeedup) -> list:
    return [n.op_type for n in engine._engine.optimized_model.graph.node]


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


def test_bert_fp32_engine_runs_one_attention_kernel_per_layer_and_matches_torch(bert):
    data = batch([16, 9, 0, 12])  # the third row has no key at all
    engine = ModelSpeedup(bert, dummy_input=batch([16, 8]), num_threads=2).compress()
    ops = optimized_ops(engine)
    assert ops.count("MultiHeadAttention") == LAYERS and "Softmax" not in ops and "IsNaN" not in ops
    with torch.no_grad():
        expected = bert(**data).logits
    got = engine.inference(data)[0].logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # the empty row too (the NaN guard's zeros)


def test_bert_dynamic_engine_matches_the_simulation_with_and_without_the_fusion(bert):
    data = batch([16, 5, 11, 16])
    model = copy.deepcopy(bert)
    quantizer = ObserverQuantizer(model, DYNAMIC)
    quantizer.compress()
    with torch.no_grad():
        simulated = model(**data).logits
    engine = ModelSpeedup(bert, dummy_input=data, config=quantizer.calibration_config(), num_threads=2).compress()
    assert optimized_ops(engine).count("MultiHeadAttention") == LAYERS
    got = engine.inference(data)[0].logits
    torch.testing.assert_close(got, simulated, rtol=1e-3, atol=2e-4)
    # the fused graph computes what the graph without the fusion computes
    served = onnx.load_from_string(engine._engine.serialize())
    assert any(n.op_type == "MultiHeadAttention" for n in served.graph.node)
    unfused = engine.annotated_model
    feeds = {k: v.numpy() for k, v in data.items()}
    reference = ort.InferenceSession(unfused.SerializeToString(), providers=["CPUExecutionProvider"])
    out = reference.run(None, {i.name: feeds[i.name] for i in reference.get_inputs()})[0]
    np.testing.assert_allclose(got.numpy(), out, rtol=1e-4, atol=1e-5)


def test_vit_attention_is_fused_and_matches_torch():
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64)).eval()
    x = torch.randn(3, 3, 32, 32)
    engine = ModelSpeedup(vit, dummy_input=x, num_threads=2).compress()
    assert optimized_ops(engine).count("MultiHeadAttention") == LAYERS
    with torch.no_grad():
        torch.testing.assert_close(engine.inference(x)[0].logits, vit(pixel_values=x).logits, rtol=1e-4, atol=1e-5)


def test_quantized_attention_products_keep_their_own_nodes(bert):
    """A config that quantizes the attention matmuls themselves: nothing float left to fuse."""
    data = batch([16, 7])
    config = [{"op_types": ["Linear"], "quant_types": ["weight", "input"], "quant_bits": 8},
              {"op_types": ["MatMul"], "quant_types": ["input"], "quant_bits": 8}]
    model = copy.deepcopy(bert)
    quantizer = ObserverQuantizer(model, config)
    with torch.no_grad():
        model(**data)
    quantizer.compress()
    engine = ModelSpeedup(bert, dummy_input=data, config=quantizer.calibration_config(), num_threads=2).compress()
    ops = optimized_ops(engine)
    assert "MultiHeadAttention" not in ops and "Softmax" in ops
    matmuls = [r for r in layer_rows(engine.precision_report()) if "MatMul" in r["layer"]]
    assert [(r["layer"], r["actual"]) for r in matmuls] == [("::MatMul", "int8")]  # every product, one config layer


def test_a_graph_without_attention_is_returned_unchanged():
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])]))
    fused, names = fuse_attention(model)
    assert fused is model and names == []


def test_masked_cores_need_opset_15_and_are_left_whole_below_it(bert):
    engine = ModelSpeedup(bert, dummy_input=batch([16, 8]), num_threads=2).compress()
    graph = onnx.shape_inference.infer_shapes(engine.annotated_model, data_prop=True)
    fused, names = fuse_attention(graph)
    assert sum(n.op_type == "MultiHeadAttention" for n in fused.graph.node) == LAYERS and names
    old = onnx.ModelProto()
    old.CopyFrom(graph)
    next(o for o in old.opset_import if o.domain in ("", "ai.onnx")).version = 14  # Shape(start, end) needs 15
    unchanged, names = fuse_attention(old)
    assert unchanged is old and names == []
