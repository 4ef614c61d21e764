"""What each backend runs in integer, as small per-backend op-rule sets (one registry).

The placement policy (:mod:`.policy`) reads these rules; it never hard-codes an op.

ONNX Runtime (CPU provider): the QDQ selectors of ``qdq_selector_action_transformer.cc``
(onnxruntime/core/optimizer/qdq_transformer/selectors_actions): Conv, MatMul and Gemm with
quantized inputs and weights; Add and Mul (``2DQ`` -> QLinearAdd/QLinearMul); Concat
(``*DQ`` -> QLinearConcat); AveragePool, GlobalAveragePool, LeakyRelu, Sigmoid, Softmax
(``1DQ`` -> QLinear*); ops that do not change values run on the quantized tensor when the Q/DQ
around them are equal (``drop``: MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze,
Slice...). ``ReluQuantFusion``/``ClipQuantFusion`` remove a ReLU/Clip in front of a
QuantizeLinear whose grid already saturates there, so a conv/add followed by a ReLU is one
integer kernel when the ReLU's output is quantized with zero point 0. ReduceMean over the
spatial axes is run as GlobalAveragePool (the backend rewrites it). HardSigmoid (alone, as the
squeeze-excitation gate of MobileNetV3, or inside HardSwish = x * HardSigmoid(x)) has no ONNX
Runtime kernel of its own, but on the fixed output grid [0, 1] (uint8, scale 1/255) it is a
QLinearAdd whose output saturates (:mod:`mixq.speedup.backends.ort_hardsigmoid`), so the
HardSwish becomes QLinearAdd + QLinearMul instead of a float round trip. A 4-D BatchNorm on a
quantized tensor (one no conv before it absorbs: DenseNet's BN -> ReLU -> conv) runs as a
depthwise 1x1 QLinearConv (:mod:`mixq.speedup.backends.ort_channel_affine`); ONNX Runtime's own
quantizer leaves it in float, NCHW, between Transposes. A Concat's inputs that nothing else reads
(Inception's branch outputs) are quantized on the Concat's own grid, so QLinearConcat copies them
instead of requantizing each (the simulation needs nothing more: quantizing on one grid commutes
with concatenation).

TensorRT (explicit quantization, strongly typed): Q/DQ on the inputs of Conv/MatMul/Gemm (and
their weights) and on the residual input of an Add that follows a conv; TensorRT fuses the rest
itself ("Q/DQ Layer-Placement Recommendations", TensorRT developer guide, "Working with
Quantized Types"). Grids are symmetric int8 (zero point 0).

OpenVINO (CPU plugin): TensorRT's placement on affine uint8 grids. Its ONNX frontend turns every
Q/DQ pair into a FakeQuantize; its low-precision transformations run Convolution/MatMul in
u8 x i8 where FakeQuantizes feed them and fuse what follows (bias, ReLU, a residual Add, the next
FakeQuantize) into the kernel as post-ops, without rounding the conv's output first. So the
placement quantizes conv/matmul inputs and the residual input of an Add, not conv outputs:
with ONNX Runtime's placement (a Q after every conv) the fused kernel skipped that rounding
and 1.5% of a CIFAR ResNet-20's predictions differed from the simulation; with this one, none.
Two more rules keep every tensor between kernels in u8, as ONNX Runtime's positions do
(ResNet-50: 52 of 53 convs write u8 instead of 48, MaxPool runs on codes): MaxPool and Flatten
keep their input's grid (the point moves before them: max and reshaping commute with a monotone
quantizer), and an Add of two convs (a projection shortcut) quantizes its second input, so that
conv writes u8 and the first fuses the Add.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Dict, FrozenSet, Optional, Tuple

import onnx


@dataclass(frozen=True)
class OpRules:
    """One backend's integer-execution rules."""

    backend: str
    integer_ops: FrozenSet[str]          # integer kernels when data inputs and output are quantized
    grid_ops: FrozenSet[str]             # output stays on the input's grid: no range of their own
    fusable_activations: FrozenSet[str]  # absorbed into the integer op before them (output quantized)
    float_output_ops: FrozenSet[str]     # integer kernels that may return float (no Q needed after)
    quantize_outputs: bool               # integer ops need a QuantizeLinear after them
    quantize_residual_input: bool        # quantize the non-conv input of an Add that follows a conv
    default_scheme: str
    default_dtype: str
    quantize_conv_residual: bool = False  # an Add of two convs: quantize its second input (one conv fuses the Add)
    fixed_output_ranges: Tuple[Tuple[str, float, float], ...] = ()  # (op, lo, hi): output grid set by the op, not data
    share_concat_grid: bool = False  # a Concat's inputs that only it reads take its output's grid (a copy, no requantization)
    split_hardswish: bool = False  # export HardSwish as x * HardSigmoid(x) (the gate then has a grid of its own)

    def fixed_range(self, op_type: str) -> Optional[Tuple[float, float]]:
        """The range an integer ``op_type``'s output is quantized on regardless of data, if any."""
        return next(((lo, hi) for op, lo, hi in self.fixed_output_ranges if op == op_type), None)

    def is_integer_op(self, node: onnx.NodeProto, constant_inputs: int) -> bool:
        """True if ``node`` (with ``constant_inputs`` constant data inputs) runs integer here."""
        if node.op_type not in self.integer_ops:
            return False
        if node.op_type in ("Add", "Mul"):
            return constant_inputs == 0  # a constant operand would be requantized per tensor
        return True


ONNXRUNTIME = OpRules(
    backend="onnxruntime",
    integer_ops=frozenset({"Add", "Mul", "Concat", "Sigmoid", "AveragePool", "GlobalAveragePool", "LeakyRelu",
                           "Softmax", "ReduceMean", "HardSigmoid", "BatchNormalization"}),
    grid_ops=frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Relu",
                        "Clip", "Slice"}),
    fusable_activations=frozenset({"Relu", "Clip"}),
    float_output_ops=frozenset({"Gemm", "MatMul"}),
    quantize_outputs=True,
    quantize_residual_input=False,
    default_scheme="per_tensor_affine",
    default_dtype="uint",
    fixed_output_ranges=(("HardSigmoid", 0.0, 1.0),),
    share_concat_grid=True,
    split_hardswish=True,
)

TENSORRT = OpRules(
    backend="tensorrt",
    integer_ops=frozenset(),
    grid_ops=frozenset(),
    fusable_activations=frozenset(),
    float_output_ops=frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"}),
    quantize_outputs=False,
    quantize_residual_input=True,
    default_scheme="per_tensor_symmetric",
    default_dtype="int",
)

OPENVINO = replace(TENSORRT, backend="openvino", grid_ops=frozenset({"MaxPool", "Flatten"}), quantize_conv_residual=True,
                   default_scheme="per_tensor_affine", default_dtype="uint")

RULES: Dict[str, OpRules] = {r.backend: r for r in (ONNXRUNTIME, TENSORRT, OPENVINO)}


def tensorrt_usable() -> bool:
    """Whether TensorRT can build here: its package imports and a CUDA device exists (a broken
    install counts as absent)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
        import torch
    except Exception:
        return False
    return torch.cuda.is_available()


def openvino_usable() -> bool:
    """Whether OpenVINO's runtime imports here (a broken install counts as absent)."""
    if importlib.util.find_spec("openvino") is None:
        return False
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def auto_backend() -> str:
    """What ``backend='auto'`` means here: TensorRT where it can build (an NVIDIA GPU), else
    OpenVINO where it is installed (on x86 CPUs its oneDNN int8 kernels ran CIFAR ResNet-20 2.5x
    faster than ONNX Runtime's: README, "Choosing a backend"), else ONNX Runtime."""
    if tensorrt_usable():
        return "tensorrt"
    return "openvino" if openvino_usable() else "onnxruntime"


def rules_for(backend: str) -> OpRules:
    """The rules of ``backend`` ('onnxruntime', 'tensorrt' or 'openvino')."""
    try:
        return RULES[backend]
    except KeyError:
        raise ValueError(f"no placement rules for backend {backend!r}; choose one of {sorted(RULES)}") from None
