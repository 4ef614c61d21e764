"""int8 QAT of a tiny Hugging Face BERT trained from scratch (issue #11): accuracy kept, engine = simulation.

The task: a padded sequence of random tokens holds one token A and one token B at random
positions; the label says whether A comes before B. A bag of words cannot tell (both tokens are
always there), so the model has to use positions through attention; a 2-layer BERT learns it to
~99% in a few hundred steps. Skipped, saying why, without ``transformers``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="Hugging Face models need `pip install transformers`")

from mixq.quantizers import QAT_Quantizer  # noqa: E402
from mixq.speedup import ModelSpeedup  # noqa: E402
from mixq.speedup.precision_report import layer_rows  # noqa: E402

VOCAB, SEQ = 64, 24
PAD, CLS, TOKEN_A, TOKEN_B, FIRST_FILLER = 0, 1, 2, 3, 4
BATCH, FP32_STEPS, QAT_STEPS = 64, 400, 100


def a_before_b(n: int, seed: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """``n`` sequences ([CLS], fillers with one A and one B, then padding; 12..24 real tokens) and
    their labels (1 where A comes before B)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
    positions = torch.arange(SEQ)[None, :]
    ids = torch.randint(FIRST_FILLER, VOCAB, (n, SEQ), generator=gen)
    ids[:, 0] = CLS
    draw = torch.rand(n, SEQ, generator=gen)
    draw[(positions == 0) | (positions >= lengths[:, None])] = -1.0  # A and B among the real tokens after [CLS]
    pos_a, pos_b = draw.topk(2, dim=1).indices.unbind(1)
    rows = torch.arange(n)
    ids[rows, pos_a] = TOKEN_A
    ids[rows, pos_b] = TOKEN_B
    mask = (positions < lengths[:, None]).long()
    return {"input_ids": ids * mask + PAD * (1 - mask), "attention_mask": mask}, (pos_a < pos_b).long()


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    model.train()
    for step in range(steps):
        x, y = a_before_b(BATCH, seed + step)
        loss = F.cross_entropy(model(**x).logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def predictions(model: torch.nn.Module, x: Dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**x).logits.argmax(1)


@pytest.mark.slow
def test_int8_qat_keeps_accuracy_and_the_engine_agrees_with_the_simulation():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    x_test, y_test = a_before_b(1000, seed=10**6)  # held out: seeds the training never draws

    train(model, torch.optim.AdamW(model.parameters(), lr=2e-3), FP32_STEPS, seed=0)
    fp32_accuracy = 100 * (predictions(model, x_test) == y_test).float().mean().item()
    assert fp32_accuracy >= 95, f"the fp32 model did not learn the task: {fp32_accuracy:.1f}%"

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    example, _ = a_before_b(16, seed=2**30)
    quantizer = QAT_Quantizer(model, [{"op_types": ["Linear"], "quant_types": ["weight"], "quant_bits": 8}],
                              optimizer, dummy_input=example)
    train(model, optimizer, QAT_STEPS, seed=FP32_STEPS)
    simulated = predictions(model, x_test)
    qat_accuracy = 100 * (simulated == y_test).float().mean().item()
    assert qat_accuracy >= fp32_accuracy - 1, (fp32_accuracy, qat_accuracy)

    engine = ModelSpeedup(model, dummy_input=example, config=quantizer.calibration_config(), num_threads=2).compress()
    rows = layer_rows(engine.precision_report())
    assert len(rows) == 14 and {(r["requested"], r["actual"]) for r in rows} == {("int8", "int8")}
    deployed = engine.inference(x_test)[0].logits.argmax(1)
    agreement = 100 * (deployed == simulated).float().mean().item()
    assert agreement >= 99.5, f"engine and QAT simulation agree on {agreement:.1f}% of predictions"
