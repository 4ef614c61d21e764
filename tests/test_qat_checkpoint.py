"""A QAT-wrapped model's quantization state round-trips through its state_dict (issue #14)."""
import torch
import torch.nn.functional as F

from mixq.compressor import unwrapped_copy
from mixq.compressor.calibration import TENSORS_KEY
from mixq.models import MnistNet
from mixq.quantizers import QAT_Quantizer

CONFIG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


def _qat(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return QAT_Quantizer(model, CONFIG, optimizer, dummy_input=x[:2]), optimizer


def test_state_dict_restores_ranges_and_outputs():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = MnistNet()
    quantizer, optimizer = _qat(model, x)
    model.train()
    for i in range(0, 64, 16):
        optimizer.zero_grad()
        F.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
        optimizer.step()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("mixq_point_") for k in state)

    torch.manual_seed(1)
    restored = MnistNet()
    other, _ = _qat(restored, x)
    restored.load_state_dict(state)
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    assert other.calibration_config()[TENSORS_KEY] == quantizer.calibration_config()[TENSORS_KEY]
    assert not any(k.startswith("mixq_point_") for k in unwrapped_copy(restored).state_dict())
