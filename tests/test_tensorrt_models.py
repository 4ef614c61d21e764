"""The TensorRT-annotated graph of every model the suite builds passes the conformance checker.

For each model and precision (fp32, fp16, int8, mixed, 4-bit, automatic int8) the graph that
``ModelSpeedup(backend='tensorrt')`` writes is prepared for TensorRT (int32 biases folded, zero
points made zero, opset fitted) and checked against the rules TensorRT documents
(:mod:`mixq.speedup.backends.tensorrt_rules`). The preparation must not change a single output
(ONNX Runtime before vs after). Adding a model is one line in ``MODELS``; the CNN zoo and the
transformer models run under ``-m slow`` when their modules exist.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, numpy_helper

from mixq.models import MnistNet, resnet18_cifar
from mixq.quantizers import ObserverQuantizer
from mixq.speedup import ModelSpeedup
from mixq.speedup.backends.base import BackendUnavailable
from mixq.speedup.backends.tensorrt_prepare import prepare_for_tensorrt
from mixq.speedup.backends.tensorrt_rules import TensorRTConformanceError, check_tensorrt_graph

ConfigFn = Callable[[nn.Module], Optional[List[dict]]]


def _weighted(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def uniform(bits: int) -> ConfigFn:
    """Weights and inputs of every Conv2d/Linear at ``bits`` (TensorRT's symmetric defaults)."""
    return lambda model: [{"quant_types": ["weight", "input"], "quant_bits": bits, "op_types": ["Conv2d", "Linear"]}]


def generic_mixed(model: nn.Module) -> List[dict]:
    """int8 everywhere but the first conv (fp16) and the last layer (fp32)."""
    names = _weighted(model)
    return uniform(8)(model) + [
        {"quant_types": ["weight", "input"], "quant_bits": 16, "op_names": [names[0]]},
        {"exclude": True, "op_names": [names[-1]]}]


MNIST_INT8 = [  # examples/mnist_speedup.py
    {"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]
MNIST_MIXED = [
    {"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1", "conv2"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2"]},
    {"quant_types": ["weight"], "quant_bits": 16, "op_names": ["fc1"]},
]
_RESIDUAL_BNS = [f"layer{s}.{b}.bn2" for s in range(1, 5) for b in (0, 1)] + [f"layer{s}.0.shortcut.1"
                                                                             for s in (2, 3, 4)]
CIFAR_INT8 = [  # examples/cifar_speedup.py
    {"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_names": _RESIDUAL_BNS},
]
CIFAR_MIXED = CIFAR_INT8 + [
    {"quant_types": ["weight", "input"], "quant_bits": 16, "op_names": ["conv1", "fc"]},
    {"exclude": True, "op_names": ["relu"] + [f"layer1.{b}.{m}" for b in (0, 1)
                                              for m in ("conv1", "relu1", "conv2", "bn2", "relu2")]},
]


def w4a4(model: nn.Module) -> List[dict]:
    """4-bit weights and inputs of every Conv2d/Linear, 4-bit outputs of the ReLUs."""
    acts = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))})
    return uniform(4)(model) + ([{"quant_types": ["output"], "quant_bits": 4, "op_types": acts}] if acts else [])


@dataclass(frozen=True)
class Precision:
    """How one precision is asked for: a config list (calibrated by ObserverQuantizer) and/or
    ModelSpeedup's extra_layer_bits."""

    config: Optional[ConfigFn] = None
    extra_layer_bits: int = 32


@dataclass(frozen=True)
class ModelCase:
    make: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    int8: ConfigFn = uniform(8)
    mixed: ConfigFn = generic_mixed
    marks: Tuple = field(default_factory=tuple)
    slow: Tuple[str, ...] = ()  # precisions that run only under -m slow
    inputs: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None  # keyword inputs (token ids...) of n samples
    only: Tuple[str, ...] = ()  # a subset of the precisions (all when empty)

    def precisions(self) -> Dict[str, Precision]:
        every = {"fp32": Precision(), "fp16": Precision(extra_layer_bits=16), "int8": Precision(self.int8),
                 "mixed": Precision(self.mixed), "w4a4": Precision(w4a4), "int8-auto": Precision(extra_layer_bits=8)}
        return {k: v for k, v in every.items() if not self.only or k in self.only}


def _zoo(name: str, size: int = 64) -> ModelCase:
    """A model of the CNN zoo (``mixq.zoo.ZOO``), under ``-m slow``: the automatic int8 path (fp32,
    fp16, W4A4, mixed and hand-written int8 configs are covered on the small models; left out
    here to keep the slow tier within CI's time)."""
    def make() -> nn.Module:
        zoo = pytest.importorskip("mixq.zoo")
        if name not in getattr(zoo, "ZOO", {}):
            pytest.skip(f"mixq.zoo has no {name!r}")
        return zoo.ZOO[name](num_classes=10)
    return ModelCase(make, (1, 3, size, size), marks=(pytest.mark.slow,), only=("int8-auto",))


def _hf_bert() -> ModelCase:
    """A small Hugging Face BERT (token ids and attention mask in), under ``-m slow``."""
    def make() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=128, vocab_size=128)
        return transformers.BertForSequenceClassification(config)

    def inputs(n: int) -> Dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        mask = torch.ones(n, 16, dtype=torch.long)
        mask[:, 12:] = 0
        return {"input_ids": torch.randint(0, 128, (n, 16), generator=gen), "attention_mask": mask}
    return ModelCase(make, (1, 16), marks=(pytest.mark.slow,), inputs=inputs)


def _hf_vit() -> ModelCase:
    """A small Hugging Face ViT (pixel values in), under ``-m slow``."""
    def make() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
            patch_size=8, num_labels=10))
    return ModelCase(make, (1, 3, 32, 32), marks=(pytest.mark.slow,))


MODELS: Dict[str, ModelCase] = {
    "mnist": ModelCase(MnistNet, (1, 1, 28, 28), lambda m: MNIST_INT8, lambda m: MNIST_MIXED),
    # the config-driven precisions (fp32/fp16 are covered by MNIST, the automatic path by the zoo)
    "resnet18_cifar": ModelCase(resnet18_cifar, (1, 3, 32, 32), lambda m: CIFAR_INT8, lambda m: CIFAR_MIXED,
                                marks=(pytest.mark.slow,), only=("int8", "mixed", "w4a4")),
    "resnet50": _zoo("resnet50"),
    "mobilenet_v2": _zoo("mobilenet_v2"),
    "mobilenet_v3_large": _zoo("mobilenet_v3_large"),
    "efficientnet_b0": _zoo("efficientnet_b0"),
    "densenet_small": _zoo("densenet_small"),
    "googlenet": _zoo("googlenet"),
    "bert": _hf_bert(),
    "vit": _hf_vit(),
}
CASES = [pytest.param(model, precision, id=f"{model}-{precision}",
                      marks=case.marks + ((pytest.mark.slow,) if precision in case.slow else ()))
         for model, case in MODELS.items() for precision in case.precisions()]


# quantizers that place Q/DQ per backend (DESIGN.md section 5) take backend='tensorrt'
_TENSORRT_PLACEMENT = ({"backend": "tensorrt"} if "backend" in inspect.signature(ObserverQuantizer.__init__).parameters
                       else {})


def _images(shape: Tuple[int, ...], n: int = 4) -> torch.Tensor:
    return torch.randn((n,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(0))


def tensorrt_annotated(model: nn.Module, input_shape: Tuple[int, ...], precision: Precision,
                       tmp_path, inputs: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None
                       ) -> Tuple[onnx.ModelProto, Dict[str, List[str]], dict]:
    """The annotated graph ModelSpeedup(backend='tensorrt') hands to the backend, the plan's
    ``{layer: [nodes]}`` and the calibration config. Without tensorrt the build stops at
    ``check_available`` (a graph TensorRT would refuse, at the backend's CPU check), after the
    graph is written to ``onnx_path``."""
    images = inputs(4) if inputs is not None else _images(input_shape)
    config = None
    config_list = precision.config(model) if precision.config else None
    if config_list:
        model = copy.deepcopy(model).eval()
        quantizer = ObserverQuantizer(model, config_list, **_TENSORRT_PLACEMENT)
        with torch.no_grad():
            model(**images) if isinstance(images, dict) else model(images)
        quantizer.compress()
        config = quantizer.calibration_config()
    onnx_path = tmp_path / "annotated.onnx"
    shape = dict(dummy_input=images) if inputs is not None else dict(input_shape=(4,) + tuple(input_shape[1:]))
    speedup = ModelSpeedup(model, config=config, backend="tensorrt", onnx_path=str(onnx_path),
                           extra_layer_bits=precision.extra_layer_bits,
                           calib_data_loader=[images] if precision.extra_layer_bits == 8 else None, **shape)
    try:
        speedup.compress()
    except (BackendUnavailable, TensorRTConformanceError):  # the graph is written before either
        pass
    return onnx.load(str(onnx_path)), speedup.plan.layer_nodes(), config or {}


def _run(model: onnx.ModelProto, x) -> np.ndarray:
    """The first output of ``model`` on ``x`` (an array for the one input, or a dict by input name)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = x if isinstance(x, dict) else {session.get_inputs()[0].name: x}
    return session.run(None, feeds)[0]


def _int32_dequantize(model: onnx.ModelProto) -> List[str]:
    inits = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == TensorProto.INT32]


def _nonzero_zero_points(model: onnx.ModelProto) -> List[str]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and len(n.input) > 2 and np.any(inits[n.input[2]])]


@pytest.mark.parametrize("model_name,precision_name", CASES)
def test_tensorrt_annotated_graph_conforms(model_name, precision_name, tmp_path):
    case = MODELS[model_name]
    torch.manual_seed(0)
    model = case.make().eval()
    precision = case.precisions()[precision_name]
    annotated, layer_nodes, config = tensorrt_annotated(model, case.input_shape, precision, tmp_path, case.inputs)

    prepared = prepare_for_tensorrt(annotated, layer_nodes, config=config)  # raises, naming layers
    assert check_tensorrt_graph(prepared, layer_nodes) == []
    assert _int32_dequantize(prepared) == [] and _nonzero_zero_points(prepared) == []
    if precision_name in ("int8", "mixed", "w4a4", "int8-auto"):
        assert any(n.op_type == "DequantizeLinear" for n in prepared.graph.node)
        if _int32_dequantize(annotated):  # the shared graph keeps int32 biases (for ONNX Runtime)
            assert {v.rule for v in check_tensorrt_graph(annotated, layer_nodes)} == {"dq-input-type"}
    if precision_name == "fp16":
        assert any(n.op_type == "Cast" for n in prepared.graph.node)
    x = {k: v.numpy() for k, v in case.inputs(3).items()} if case.inputs else _images(case.input_shape, n=3).numpy()
    before, after = _run(annotated, x), _run(prepared, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))


AFFINE = {"quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
          "quant_dtype": {"weight": "int", "input": "uint"}}


def _affine_mnist(tmp_path):
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv2", "fc1"], **AFFINE},
                   {"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1"]}]
    torch.manual_seed(0)
    return tensorrt_annotated(MnistNet().eval(), (1, 1, 28, 28), Precision(lambda m: config_list), tmp_path)


def test_affine_activations_are_refused_naming_layers_and_keys(tmp_path):
    """The ONNX Runtime advice (affine uint8 activations) cannot be built by TensorRT: refused
    before any build, naming exactly the config layers, the quant type and the keys to change."""
    annotated, layer_nodes, config = _affine_mnist(tmp_path)
    with pytest.raises(TensorRTConformanceError) as err:
        prepare_for_tensorrt(annotated, layer_nodes, config=config)
    violations = err.value.violations
    assert {v.rule for v in violations} == {"zero-point"}
    by_layer = [v for v in violations if not v.node]  # listed first: one per config layer and quant type
    assert violations[:len(by_layer)] == by_layer
    assert sorted(layer for v in by_layer for layer in v.layers) == [("conv2", "input"), ("fc1", "input")]
    message = str(err.value)
    assert "config layer 'conv2' (input)" in message and "config layer 'fc1' (input)" in message
    assert "'quant_scheme': 'per_tensor_symmetric'" in message and "'quant_dtype': 'int'" in message


def test_affine_activations_without_config_still_name_the_layers_around_each_node(tmp_path):
    """From the graph alone (the backend's own check in build) each Q/DQ names the layers it sits
    between: the affine inputs of conv2 and fc1 are among them, conv1's own input is not."""
    annotated, layer_nodes, _ = _affine_mnist(tmp_path)
    with pytest.raises(TensorRTConformanceError) as err:
        prepare_for_tensorrt(annotated, layer_nodes)
    named = {layer for v in err.value.violations for layer in v.layers}
    assert {("conv2", "input"), ("fc1", "input")} <= named and ("conv1", "input") not in named
    assert all(v.node for v in err.value.violations)


def test_symmetric_uint_activations_build_as_int8(tmp_path):
    """A symmetric uint8 grid (zero point 128) is the int8 grid: accepted, zero points all zero."""
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"],
                    "quant_dtype": {"weight": "int", "input": "uint"}}]
    torch.manual_seed(0)
    annotated, layer_nodes, config = tensorrt_annotated(MnistNet().eval(), (1, 1, 28, 28),
                                                        Precision(lambda m: config_list), tmp_path)
    prepared = prepare_for_tensorrt(annotated, layer_nodes, config=config)
    assert _nonzero_zero_points(prepared) == []
