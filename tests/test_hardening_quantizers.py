"""Issue #13, items 3, 4, 5 and 16: bit widths an engine cannot run, a module registered under two
names, and quantizer arguments that are wrong are handled before the model is touched.

The reference for the shared module is a float copy of the model whose weights are quantized
here with the per-channel symmetric formula (max |w| / (2^(b-1) - 1)), at both call sites.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from schema import SchemaError

from mixq.compressor import unwrapped_copy
from mixq.models import MnistNet
from mixq.quantizers import NaiveQuantizer, ObserverQuantizer, QAT_Quantizer
from mixq.speedup import ModelSpeedup

WRAPPER = "QuantizerModuleWrapper"


def _wrapped(model: nn.Module) -> bool:
    return any(type(m).__name__ == WRAPPER for m in model.modules())


@pytest.mark.parametrize("bits", [9, 12, 15, 17, 24, 31, 0, 33])
@pytest.mark.parametrize("quantizer", [QAT_Quantizer, ObserverQuantizer])
def test_bit_widths_without_an_engine_kernel_are_refused(quantizer, bits):
    model = MnistNet()
    with pytest.raises(SchemaError, match=r"1\.\.8 \(integer\), 16 \(fp16\) or 32 \(fp32\)"):
        quantizer(model, [{"quant_types": ["weight"], "quant_bits": {"weight": bits}, "op_types": ["Conv2d"]}])
    assert not _wrapped(model)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32])
def test_bit_widths_an_engine_runs_are_accepted(bits):
    scheme = {"quant_scheme": "per_channel_affine"} if bits == 1 else {}
    QAT_Quantizer(MnistNet(), [{"quant_types": ["weight"], "quant_bits": bits, "op_types": ["Conv2d"], **scheme}])


class Aliased(nn.Module):
    """One conv registered twice (``self.alias = self.conv``) and called at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.alias = self.conv
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.alias(torch.relu(self.conv(x)))).flatten(1))


def _fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().reshape(len(w), -1).max(1).values.reshape(-1, *[1] * (w.dim() - 1)) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


@pytest.mark.parametrize("name", ["conv", "alias"])
def test_a_module_registered_twice_is_quantized_at_both_call_sites(name):
    torch.manual_seed(0)
    model = Aliased().eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv.weight.copy_(_fake_quant(reference.conv.weight, 4))
    quantizer = ObserverQuantizer(model, [{"quant_types": ["weight"], "quant_bits": 4, "op_names": [name]}],
                                  backend=None)
    assert list(quantizer.modules_wrapper) == ["conv"]  # the alias resolves to the first name
    assert model.conv is model.alias and type(model.alias).__name__ == WRAPPER
    x = torch.randn(16, 4, 8, 8)
    with torch.no_grad():
        model(x)
        quantizer.compress()
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)  # both sites quantized
        assert not torch.allclose(model(x), Aliased.forward(unwrapped_copy(model), x))
    float_model = unwrapped_copy(model)
    assert float_model.conv is float_model.alias and not _wrapped(float_model)
    config = quantizer.calibration_config()
    assert set(config) == {"conv"}
    engine = ModelSpeedup(model, (8, 4, 8, 8), config=config).compress()
    assert len(engine.plan.layer_nodes()["conv"]) == 2  # both Conv nodes carry the int8 weight
    with torch.no_grad():
        torch.testing.assert_close(engine.inference(x)[0], reference(x), atol=1e-4, rtol=1e-4)


def test_a_misspelt_alias_still_lists_the_alias():
    with pytest.raises(SchemaError, match="close matches: alias"):
        QAT_Quantizer(Aliased(), [{"quant_types": ["weight"], "quant_bits": 8, "op_names": ["alias2"]}])


def test_fold_bn_without_dummy_input_leaves_the_model_untouched():
    model = MnistNet()
    config = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}]
    with pytest.raises(SchemaError, match="fold_bn=True needs dummy_input"):
        QAT_Quantizer(model, config, fold_bn=True)
    assert not _wrapped(model)
    QAT_Quantizer(model, config, fold_bn=True, dummy_input=torch.randn(2, 1, 28, 28))  # the retry works
    assert _wrapped(model)


@pytest.mark.parametrize("quantizer", [QAT_Quantizer, ObserverQuantizer])
def test_dummy_input_of_the_wrong_shape_leaves_the_model_untouched(quantizer):
    model = MnistNet().train()
    before = copy.deepcopy(model.state_dict())
    config = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d"]}]
    with pytest.raises(ValueError, match=r"dummy_input does not fit the model \(.*channels") as info:
        quantizer(model, config, dummy_input=torch.randn(2, 3, 28, 28))
    assert len(str(info.value).splitlines()) == 1
    assert not _wrapped(model) and model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no BN statistics changed
    quantizer(model, config, dummy_input=torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("kwargs, fragment", [({"backend": "tvm"}, "backend"), ({"ema_decay": 1.5}, "ema_decay")])
def test_other_qat_arguments_are_checked_first(kwargs, fragment):
    model = MnistNet()
    with pytest.raises(ValueError, match=fragment):
        QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}], **kwargs)
    assert not _wrapped(model)


def test_a_failure_after_wrapping_unwraps_again():
    class NotTraceable(nn.Module):  # placement exports the model: its forward fails in the exporter
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.from_numpy(x.detach().numpy()))

    model = NotTraceable()
    with pytest.raises(ValueError):
        QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]}],
                      dummy_input=torch.randn(2, 8))
    assert not _wrapped(model) and not model._forward_hooks and not model._forward_pre_hooks


def test_a_huge_op_name_is_not_echoed_whole():
    with pytest.raises(SchemaError) as info:
        NaiveQuantizer(MnistNet(), [{"quant_types": ["weight"], "quant_bits": 8, "op_names": ["x" * 10 ** 6]}])
    assert len(str(info.value)) < 300 and "is not a module of the model" in str(info.value)
