"""Every kind of bad config list gives a schema.SchemaError naming the entry, key and fix."""
import pytest
from schema import SchemaError

from mixq.models import MnistNet
from mixq.quantizers import NaiveQuantizer, ObserverQuantizer, QAT_Quantizer

OK = {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}

BAD = [
    # (quantizer, config_list, fragments the message must contain)
    (QAT_Quantizer, [{**OK, "quant_bitz": 8}], ["config_list[0]", "quant_bitz", "quant_bits"]),
    (QAT_Quantizer, [OK, {"quant_types": ["weight"], "quant_bits": 8, "op_names": ["conv3"]}],
     ["config_list[1]", "op_names", "conv3", "conv1", "conv2"]),
    (QAT_Quantizer, [{**OK, "op_types": ["Conv2D"]}], ["op_types", "Conv2D", "Conv2d"]),
    (QAT_Quantizer, [{**OK, "quant_bits": 0}], ["quant_bits", "1..8 (integer), 16 (fp16) or 32"]),
    (QAT_Quantizer, [{**OK, "quant_bits": 33}], ["quant_bits", "1..8 (integer), 16 (fp16) or 32"]),
    (QAT_Quantizer, [{**OK, "quant_bits": {"weight": 8, "output": 8}}], ["quant_bits", "output", "quant_types"]),
    (QAT_Quantizer, [{**OK, "quant_types": ["weight", "input"], "quant_bits": {"weight": 8}}], ["input", "no bit width"]),
    (QAT_Quantizer, [{**OK, "quant_types": ["wieght"]}], ["quant_types"]),
    (QAT_Quantizer, [{**OK, "quant_scheme": "per_tensor_symetric"}], ["quant_scheme"]),
    (QAT_Quantizer, [{**OK, "quant_dtype": "float"}], ["quant_dtype"]),
    (QAT_Quantizer, [{**OK, "quant_start_step": -1}], ["quant_start_step"]),
    (QAT_Quantizer, [{"quant_bits": 8, "op_types": ["Conv2d"]}], ["config_list[0]", "quant_types"]),
    (QAT_Quantizer, [{"quant_types": ["weight"], "quant_bits": 8}], ["selects no layer", "op_types"]),
    (QAT_Quantizer, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["ReLU6"]}],
     ["weight", "relu1", "ReLU6", "Drop 'weight'"]),
    (QAT_Quantizer, [{"quant_types": ["input"], "quant_bits": 8, "quant_scheme": "per_channel_symmetric",
                      "op_types": ["Conv2d"]}], ["per tensor"]),
    (QAT_Quantizer, [{"quant_types": ["weight"], "quant_bits": 1, "op_types": ["Conv2d"]}], ["1-bit", "affine"]),
    (QAT_Quantizer, [OK, {"exclude": True, "op_types": ["Conv2d"]}], ["selects no layer"]),
    (QAT_Quantizer, "conv1", ["non-empty list"]),
    (QAT_Quantizer, [["weight"]], ["config_list[0]", "must be a dict"]),
    (NaiveQuantizer, [{"quant_types": ["input"], "quant_bits": 8, "op_types": ["Conv2d"]}],
     ["NaiveQuantizer cannot quantize 'input'"]),
    (NaiveQuantizer, [{**OK, "quant_bits": 16}], ["at most 8 bits"]),
    (ObserverQuantizer, [{**OK, "observer": "histogramm"}], ["observer"]),
    (NaiveQuantizer, [{**OK, "observer": "mse"}], ["unknown key", "observer"]),
]


@pytest.mark.parametrize("quantizer,config_list,fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_is_a_clear_schema_error(quantizer, config_list, fragments):
    model = MnistNet()
    with pytest.raises(SchemaError) as info:
        quantizer(model, config_list)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not any(type(m).__name__ == "QuantizerModuleWrapper" for m in model.modules()), "model was modified"


def test_last_matching_entry_wins_and_exclude_removes():
    model = MnistNet()
    q = QAT_Quantizer(model, [
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]},
        {"quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 6}, "op_names": ["fc1"]},
        {"exclude": True, "op_names": ["fc2"]},
    ])
    assert set(q.layer_configs) == {"conv1", "conv2", "fc1"}
    assert q.layer_configs["fc1"].bits == {"weight": 4, "input": 6}
    assert q.layer_configs["conv1"].bits == {"weight": 8}
    assert q.layer_configs["conv1"].scheme["weight"] == "per_channel_symmetric"


def test_wrapping_is_in_place_and_compress_returns_same_model():
    model = MnistNet()
    q = QAT_Quantizer(model, [OK])
    assert q.compress() is model
    assert type(model.conv1).__name__ == "QuantizerModuleWrapper"
    with pytest.raises(SchemaError, match="already wrapped"):
        QAT_Quantizer(model, [OK])
