"""ObserverQuantizer calibration split across 2 gloo ranks (issue #15) equals one process that saw
the union of the shards: min/max exactly, percentile/MSE within one quantization step (their
histograms are re-binned onto the global range, once per rank instead of once per growth of
the range), moving_average as the mean of the ranks' averages. The shards are unequal (3 and 2
batches): calibration needs no lockstep, only compress() and export are collective."""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Tuple

import pytest
import torch

from mixq.compressor import QuantizerModuleWrapper, qparams_from_range
from mixq.compressor.calibration import TENSORS_KEY, CalibrationConfig, load_calibration_config
from mixq.compressor.distributed import RankMismatchError
from mixq.models import MnistNet
from mixq.quantizers import ObserverQuantizer
from test_distributed_qat import assert_no_error, mnist_train, run_ranks

BATCH = 64
SHARDS = {0: range(0, 3), 1: range(3, 5)}  # global batch indices each rank calibrates on
OBSERVERS = ("minmax", "percentile", "mse", "moving_average")


def config_list(observer: str, bits: int = 8) -> List[Dict[str, Any]]:
    return [{"quant_types": ["weight", "input"], "quant_bits": bits, "op_types": ["Conv2d", "Linear"],
             "observer": observer}]


def calibrate(observer: str, batches: Iterable[int], path: str = None) -> Tuple[CalibrationConfig, Dict[str, str]]:
    """The exported calibration and each placed tensor's observer class."""
    x, _ = mnist_train()
    torch.manual_seed(0)  # the same weights on every rank
    model = MnistNet().eval()
    quantizer = ObserverQuantizer(model, config_list(observer))
    with torch.no_grad():
        for b in batches:
            model(x[b * BATCH:(b + 1) * BATCH])
    quantizer.compress()
    kinds = {key: type(o).__name__ for key, o in quantizer.point_observers.items()}
    return quantizer.export_model(None, path), kinds


def calibration_rank(rank: int, world: int, tmp: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {obs: calibrate(obs, SHARDS[rank], os.path.join(tmp, f"{obs}_{rank}.json"))[0]
                           for obs in OBSERVERS}
    model = MnistNet()
    try:  # rank 1 asks for 4 bits: refused on every rank, before the model is wrapped
        ObserverQuantizer(model, config_list("minmax", 8 if rank == 0 else 4))
    except RankMismatchError as exc:
        out["mismatch"] = str(exc)
    out["wrapped_after_mismatch"] = any(isinstance(m, QuantizerModuleWrapper) for m in model.modules())
    return out


def single_process(observer: str, batches: Iterable[int]) -> Tuple[CalibrationConfig, Dict[str, str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same float results
    try:
        return calibrate(observer, batches)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibration")
    results = run_ranks(calibration_rank, tmp)
    assert_no_error(results)
    return tmp, results


def ranges(config: CalibrationConfig) -> Dict[str, Any]:
    return {key: t for key, t in config[TENSORS_KEY].items()}


@pytest.mark.parametrize("observer", OBSERVERS)
def test_every_rank_returns_rank0s_file(ranks, observer):
    tmp, (r0, r1) = ranks
    assert r0[observer] == r1[observer]
    assert load_calibration_config(str(tmp / f"{observer}_0.json")) == r0[observer]
    assert not (tmp / f"{observer}_1.json").exists()  # rank 1 wrote nothing


def test_minmax_equals_one_process_on_the_union_exactly(ranks):
    _, (r0, _) = ranks
    assert r0["minmax"] == single_process("minmax", range(5))[0]


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_histogram_observers_within_one_quantization_step(ranks, observer):
    _, (r0, _) = ranks
    reference, _ = single_process(observer, range(5))
    mine, ref = ranges(r0[observer]), ranges(reference)
    assert mine.keys() == ref.keys()
    for key, t in ref.items():
        scale, _ = qparams_from_range(torch.tensor(t["tracked_min"]), torch.tensor(t["tracked_max"]), t["bits"],
                                      t["scheme"], t["dtype"])
        for side in ("tracked_min", "tracked_max"):
            assert abs(mine[key][side] - t[side]) <= float(scale), (key, side, mine[key][side], t[side], float(scale))
    for layer in reference:
        if not layer.startswith("@"):  # weights are the same on every rank: not merged, identical scales
            assert r0[observer][layer]["weight_scale"] == reference[layer]["weight_scale"]


def test_moving_average_is_the_mean_of_the_ranks_averages(ranks):
    """Tensors the placement adds beside the configured inputs keep min/max: exact over the union."""
    _, (r0, _) = ranks
    (shard0, kinds), (shard1, _) = (single_process("moving_average", SHARDS[r]) for r in (0, 1))
    assert "MovingAverageMinMaxObserver" in kinds.values() and "MinMaxObserver" in kinds.values()
    mine, per_rank = ranges(r0["moving_average"]), [ranges(shard0), ranges(shard1)]
    for key, t in mine.items():
        a, b = per_rank[0][key], per_rank[1][key]
        if kinds[key] == "MinMaxObserver":
            assert (t["tracked_min"], t["tracked_max"]) == (min(a["tracked_min"], b["tracked_min"]),
                                                            max(a["tracked_max"], b["tracked_max"])), key
            continue
        for side in ("tracked_min", "tracked_max"):
            assert t[side] == pytest.approx((a[side] + b[side]) / 2, rel=1e-6, abs=1e-7), (key, side)


def test_ranks_with_different_config_lists_are_refused(ranks):
    _, results = ranks
    for res in results:
        assert "ranks [1]" in res["mismatch"] and "resolved layer configs" in res["mismatch"]
        assert not res["wrapped_after_mismatch"]
