"""Precision plan: grids equal the quantizer's, exact range derivation, BN folding of integer weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mixq.compressor.fake_quant import dequantize, qparams_from_range, quant_range, quantize
from mixq.quantizers import ObserverQuantizer
from mixq.placement.module_map import module_calls
from mixq.placement.onnx_export import FoldedBatchNorm, conv_bn_pairs, export_onnx
from mixq.speedup.grid import Grid, grid_from_range
from mixq.speedup.precision_plan import build_plan
from mixq.speedup.weight_codes import choose_folds, weight_codes


@pytest.mark.parametrize("bits, scheme, dtype", [(8, "per_tensor_symmetric", "int"), (8, "per_tensor_symmetric", "uint"),
                                                 (8, "per_tensor_affine", "uint"), (8, "per_tensor_affine", "int"),
                                                 (4, "per_tensor_symmetric", "int"), (3, "per_tensor_affine", "uint")])
def test_grid_is_the_quantizer_grid(bits, scheme, dtype):
    lo, hi = -0.7, 2.3
    grid = grid_from_range(lo, hi, bits, scheme, dtype)
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, scheme, dtype)
    qmin, qmax = quant_range(bits, dtype, scheme.endswith("symmetric"))
    x = torch.linspace(-5, 5, 2001)
    reference = dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)
    # the int8 storage form: codes in [-128, 127] with the grid's zero point, clipped to [lo, hi]
    q = torch.clamp(torch.round(x / grid.scale) + grid.zero_point, -128, 127)
    stored = (q - grid.zero_point) * grid.scale
    stored = torch.clamp(stored, grid.real_min, grid.real_max)
    assert torch.allclose(stored, reference, atol=1e-6)
    assert grid.needs_clip == (bits < 8)


def test_symmetric_int_and_uint_are_one_grid():
    assert grid_from_range(-1, 3, 8, "per_tensor_symmetric", "int") == \
        grid_from_range(-1, 3, 8, "per_tensor_symmetric", "uint")


def test_clip_bounds_commute_only_on_grid_or_outside():
    grid = Grid(0.05, -128, 127)  # [-6.4, 6.35]
    assert grid.admits_bound(0.0, upper=False) and grid.admits_bound(6.35, upper=True)
    assert grid.admits_bound(7.0, upper=True) and grid.admits_bound(-9.0, upper=False)
    assert not grid.admits_bound(6.0 + 0.02, upper=True)


def _per_channel_entry(weight: torch.Tensor, bits: int = 8, folded_bn=None) -> dict:
    lo, hi = torch.aminmax(weight.reshape(weight.shape[0], -1), dim=1)
    scale, zp = qparams_from_range(lo, hi, bits, "per_channel_symmetric", "int")
    return {"weight_bits": bits, "weight_scale": scale.tolist(), "weight_zero_point": zp.tolist(),
            "weight_scheme": "per_channel_symmetric", "weight_dtype": "int", "weight_axis": 0, "folded_bn": folded_bn}


def _fq(weight: torch.Tensor, entry: dict) -> torch.Tensor:
    scale, zp = torch.tensor(entry["weight_scale"]), torch.tensor(entry["weight_zero_point"])
    return dequantize(quantize(weight, scale, zp, -128, 127, 0), scale, zp, 0)


def _deq(codes, scales, zps, axis):
    return dequantize(codes, scales, zps, axis)


def test_bn_folding_keeps_integer_weights():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    factor = torch.tensor([0.5, -2.0, 1.5, -0.1, 3.0, 1.0])
    bn = FoldedBatchNorm("conv", "bn", factor, 0)
    shape = (-1, 1, 1, 1)
    # scales of the raw weight, BN folded at export: integers unchanged up to sign, scale * |f|
    entry = _per_channel_entry(w)
    codes, scales, zps, axis = weight_codes(w, entry, "conv", bn, fold_at_export=True)
    assert torch.equal(codes.abs(), quantize(w, torch.tensor(entry["weight_scale"]), torch.zeros(6), -128, 127, 0).abs())
    assert torch.allclose(_deq(codes, scales, zps, axis), _fq(w, entry) * factor.reshape(shape), atol=1e-6)
    # scales of the folded weight (QAT simulated the folding), BN kept in the graph: scale / |f|
    folded_entry = _per_channel_entry(w * factor.reshape(shape), folded_bn="bn")
    codes, scales, zps, axis = weight_codes(w, folded_entry, "conv", bn, fold_at_export=False)
    expected = _fq(w * factor.reshape(shape), folded_entry) / factor.reshape(shape)
    assert torch.allclose(_deq(codes, scales, zps, axis), expected, atol=1e-6)


def test_weight_codes_reject_a_config_of_other_weights():
    w = torch.randn(4, 2, 3, 3)
    entry = _per_channel_entry(w)
    for other in (w * 0.1, w * 10):
        with pytest.raises(ValueError, match="does not match the model's weights"):
            weight_codes(other, entry, "conv", None, fold_at_export=False)


class ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.side = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.pool(self.relu(self.bn(self.conv(x))))
        z = self.side(x)[:, :, ::2, ::2] + y  # a residual add with an unquantized side
        return self.fc(torch.flatten(y, 1)) + z.mean()


def _plan(model, config_list, x):
    """The plan of the config's literal module-boundary quantization (``backend=None``)."""
    q = ObserverQuantizer(model, config_list, backend=None)
    with torch.no_grad():
        model(x)
    q.compress()
    cfg = q.calibration_config()
    from mixq.compressor import unwrapped_copy
    float_model = unwrapped_copy(model).eval()
    pairs = conv_bn_pairs(float_model, (x[:2],))
    folds = choose_folds(float_model, pairs, cfg)
    exported = export_onnx(float_model, (x[:2],), folds, keep=[b for c, b in pairs.items() if c not in folds])
    calls = module_calls(exported.model, [n for n, _ in float_model.named_modules()])
    return build_plan(exported.model, calls, exported.folded, float_model, cfg), calls, folds, cfg


def test_ranges_derived_through_relu_and_maxpool_exactly():
    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    x = torch.randn(16, 3, 8, 8)
    config = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_names": ["conv", "fc"]},
              {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu"]}]
    plan, calls, folds, cfg = _plan(model, config, x)
    assert folds == {"conv": "bn"}
    conv_out = calls["conv"][0].outputs[0]
    relu_out = calls["relu"][0].outputs[0]
    relu_grid = grid_from_range(cfg["relu"]["tracked_min_output"], cfg["relu"]["tracked_max_output"], 8,
                                "per_tensor_symmetric", "int")
    assert plan.tensor_grids[relu_out] == [relu_grid]
    assert plan.tensor_grids[conv_out] == [relu_grid]  # derived backwards through ReLU
    pool_out = calls["pool"][0].outputs[0]
    assert plan.tensor_grids[pool_out] == [relu_grid]  # propagated forwards through MaxPool
    assert plan.layers["conv"].note == "" and plan.layers["fc"].note == ""
    assert set(plan.weights) == {calls["conv"][0].nodes[0], calls["fc"][0].nodes[0]}


def test_missing_range_before_residual_add_falls_back_with_reason():
    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    x = torch.randn(16, 3, 8, 8)
    config = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_names": ["side"]}]
    plan, calls, _, _ = _plan(model, config, x)
    assert "no quantization range" in plan.layers["side"].note
    assert calls["side"][0].outputs[0] not in plan.tensor_grids  # never guessed


def test_conv_output_quantized_before_bn_keeps_bn_unfolded():
    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    x = torch.randn(16, 3, 8, 8)
    config = [{"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_names": ["conv"]}]
    plan, calls, folds, _ = _plan(model, config, x)
    assert folds == {}
    assert "bn" in calls  # the BatchNorm stays (as Mul + Add), after the conv's output Q/DQ
    assert calls["conv"][0].outputs[0] in plan.tensor_grids
