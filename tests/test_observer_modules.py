"""Observers are modules with buffers, wrappers and points have observer / fake-quant switches,
and a quantizer's state round-trips through the model's state_dict (issue #14)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixq.compressor import MinMaxObserver, MSEObserver, PercentileObserver, unwrapped_copy
from mixq.models import MnistNet
from mixq.quantizers import ObserverQuantizer, QAT_Quantizer

CONFIG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
          {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]}]


def _data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _qat(seed, config, backend="onnxruntime"):
    torch.manual_seed(seed)
    model = MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, QAT_Quantizer(model, config, optimizer, backend=backend), optimizer


def _train(model, optimizer, x, y, steps):
    model.train()
    for i in range(steps):
        batch = slice(i * 16 % len(x), i * 16 % len(x) + 16)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    model.eval()


# Observers ---------------------------------------------------------------------------------------
def test_observer_state_is_buffers_with_an_uninitialised_form():
    obs = MinMaxObserver(axis=0)
    assert dict(obs.named_buffers()).keys() == {"min_val", "max_val"}
    assert not obs.has_data and obs.min_val.item() == float("inf") and obs.max_val.item() == float("-inf")
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-4.0, 7.0]])
    obs(w)
    np.testing.assert_array_equal(obs.state_dict()["min_val"].numpy(), [-2.0, 0.5, -4.0])
    np.testing.assert_array_equal(obs.state_dict()["max_val"].numpy(), [1.0, 3.0, 7.0])


def test_calculate_qparams_against_the_grid_formula():
    x = torch.tensor([-0.5, 0.25, 2.54])
    obs = MinMaxObserver()
    obs.update(x)
    scale, zp = obs.calculate_qparams(8, "per_tensor_symmetric", "int")
    assert float(scale) == pytest.approx(2.54 / 127) and int(zp) == 0
    scale, zp = obs.calculate_qparams(8, "per_tensor_affine", "uint")
    assert float(scale) == pytest.approx(3.04 / 255)
    assert int(zp) == round(0.5 / (3.04 / 255))


def test_loading_adopts_the_channel_count_and_refuses_another_histogram_size():
    w = torch.randn(6, 10)
    src = PercentileObserver(axis=0, percentile=99.0)
    src.update(w)
    dst = PercentileObserver(axis=0, percentile=99.0)
    dst.load_state_dict(src.state_dict())
    for a, b in zip(dst.compute_range(8, "per_channel_symmetric", "int"),
                    src.compute_range(8, "per_channel_symmetric", "int")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    hist = MSEObserver(bins=128)
    hist.update(torch.randn(1000))
    with pytest.raises(RuntimeError, match="histogram has 128 bins.*bins=128"):
        MSEObserver(bins=256).load_state_dict(hist.state_dict())
    with pytest.raises(RuntimeError, match="observes whole tensors"):
        MinMaxObserver().load_state_dict(src.state_dict(), strict=False)


def test_loaded_histogram_gives_the_same_range():
    data = torch.randn(5000) * 3
    src = MSEObserver(bins=512)
    for chunk in data.split(1000):
        src.update(chunk)
    dst = MSEObserver(bins=512)
    dst.load_state_dict(src.state_dict())
    assert dst.compute_range(4, "per_tensor_affine", "int") == src.compute_range(4, "per_tensor_affine", "int")


# Observers inside a wrapped model --------------------------------------------------------------
def test_observers_are_in_the_wrapped_models_state_dict_and_follow_to():
    model = MnistNet().eval()
    quantizer = ObserverQuantizer(model, CONFIG, backend=None)
    x, _ = _data()
    with torch.no_grad():
        model(x)
    state = model.state_dict()
    lo, hi = state["conv1.observers.input.min_val"], state["conv1.observers.input.max_val"]
    assert (lo.item(), hi.item()) == (x.min().item(), x.max().item())
    assert "relu1.observers.output.min_val" in state and "fc1.observers.weight.max_val" in state
    model.to(torch.float64)
    assert model.conv1.observers["input"].min_val.dtype == torch.float64
    assert model.conv1.tracked_min_input.dtype == torch.float64
    model.to("meta")
    assert model.conv1.observers["input"].min_val.device.type == "meta"
    assert quantizer.modules_wrapper["conv1"].observers["input"] is model.conv1.observers["input"]


def test_ptq_state_round_trips_through_state_dict():
    x, _ = _data(1)
    torch.manual_seed(0)
    model = MnistNet().eval()
    quantizer = ObserverQuantizer(model, [dict(CONFIG[0], observer="mse")], dummy_input=x[:2])
    with torch.no_grad():
        model(x)
    quantizer.compress()
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    fresh = MnistNet().eval()
    other = ObserverQuantizer(fresh, [dict(CONFIG[0], observer="mse")], dummy_input=x[:2])
    assert not other.compressed
    fresh.load_state_dict(state)
    assert other.compressed
    assert other.calibration_config() == quantizer.calibration_config()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# QAT checkpoint ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", None])
def test_qat_state_dict_round_trip_restores_ranges_switches_and_export(backend, tmp_path):
    config = [dict(entry, quant_start_step=3) for entry in CONFIG]
    x, y = _data(2)
    model, quantizer, optimizer = _qat(0, config, backend)
    _train(model, optimizer, x, y, steps=5)
    assert quantizer.steps == 5
    state = copy.deepcopy(model.state_dict())
    expected = quantizer.export_model(None, str(tmp_path / "a.json"))

    fresh, other, _ = _qat(1, config, backend)  # other weights, no ranges, fake quantization still off
    fresh.eval()
    with torch.no_grad():
        fresh(x[:2])  # places the tensors (backend) without training: nothing observed
        assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(state)
    assert other.steps == 5
    assert all(w.fake_quantizing for w in other.modules_wrapper.values())
    with torch.no_grad():
        out = fresh(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert not torch.equal(out, unwrapped_copy(fresh)(x))  # it is quantized
    assert other.export_model(None, str(tmp_path / "b.json")) == expected
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_qat_quant_start_step_flips_the_switches():
    config = [dict(entry, quant_start_step=2) for entry in CONFIG]
    x, y = _data(3)
    model, quantizer, optimizer = _qat(0, config)
    _train(model, optimizer, x, y, steps=1)
    assert not any(fq for _, fq in quantizer._switch_states())
    _train(model, optimizer, x, y, steps=1)
    assert all(fq for _, fq in quantizer._switch_states())


# Switches ----------------------------------------------------------------------------------------
def _ranges(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if "tracked_" in k or (k.startswith("mixq_point_") and not k.endswith("_switches"))}


@pytest.mark.parametrize("backend", ["onnxruntime", None])
def test_observer_off_freezes_every_range(backend):
    x, y = _data(4)
    model, quantizer, optimizer = _qat(0, CONFIG, backend)
    _train(model, optimizer, x, y, steps=2)
    before = _ranges(model)
    quantizer.disable_observer()
    _train(model, optimizer, x * 3, y, steps=2)
    after = _ranges(model)
    assert before.keys() == after.keys() and len(before) > 0
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, equal_nan=True)
    quantizer.enable_observer()
    _train(model, optimizer, x * 3, y, steps=1)
    assert any(not torch.equal(_ranges(model)[k], before[k]) for k in before)


@pytest.mark.parametrize("backend", ["onnxruntime", None])
def test_fake_quant_off_runs_the_float_model(backend):
    x, y = _data(5)
    model, quantizer, optimizer = _qat(0, CONFIG, backend)
    _train(model, optimizer, x, y, steps=3)
    float_model = unwrapped_copy(model).eval()
    with torch.no_grad():
        quantized = model(x)
        assert not torch.equal(quantized, float_model(x))
        quantizer.disable_fake_quant()
        torch.testing.assert_close(model(x), float_model(x), rtol=0, atol=0)
        model.conv1.enable_fake_quant()  # one layer back on: only its weight and input are quantized
        partly = model(x)
        assert not torch.equal(partly, float_model(x)) and not torch.equal(partly, quantized)
        quantizer.enable_fake_quant()
        torch.testing.assert_close(model(x), quantized, rtol=0, atol=0)
