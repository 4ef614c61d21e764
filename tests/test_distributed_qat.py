"""Distributed QAT on torch.distributed (issue #15): 2 CPU processes on the gloo backend, started
with torch.multiprocessing's spawn context (not ``mp.spawn``, which kills the surviving rank as
soon as one dies: the kill test needs the survivor's own error). Each rank writes what it saw to
``result_<rank>.pt``; the tests compare the ranks with each other and with a single-process run
in the test process on the same global batches.

The 2-rank vs 1-process tolerance: the min/max of the union batch is exact, so ranges differ only
when the weights do, and those differ only by float32 summation order (DDP averages two per-rank
gradient means, one process takes one mean over 64 samples; oneDNN may sum a conv differently for
batch 32 and 64): about one ulp per step. Compared with rtol 1e-5 after 12 steps; measured on
this machine: weight scales within 1.6e-7 relative (one or two ulps), activation ranges
bit-identical.
Without the all-reduce the two ranks' ranges differ by up to 13% after 12 steps (relu2's max
1.886 vs 2.134), so these comparisons do test it. Between ranks everything is compared bit for
bit, exports byte for byte.
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mixq.compressor import QuantizerModuleWrapper, load_calibration_config, save_calibration_config
from mixq.compressor.distributed import DistributedSetupError
from mixq.compressor.config import ConfigError
from mixq.datasets import load_mnist
from mixq.models import MnistNet
from mixq.quantizers import QAT_Quantizer

CONFIG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
          {"quant_types": ["weight", "input", "output"], "quant_bits": 8, "op_names": ["fc2"]}]  # logits: signed
GLOBAL_BATCH, STEPS, LR = 64, 12, 0.01
PG_TIMEOUT_S = 8


# --- launching ranks --------------------------------------------------------------------------
def _entry(fn: Callable, rank: int, world: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        result = fn(rank, world, tmp, *args)
    except BaseException as exc:
        result = {"error": type(exc).__name__, "message": str(exc), "time": time.time(),
                  "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(tmp, f"result_{rank}.pt"))
    if "error" not in result:
        dist.destroy_process_group()


def run_ranks(fn: Callable, tmp_path, world: int = 2, args: tuple = (), timeout_s: float = 300) -> List[Dict]:
    """Run ``fn(rank, world, tmp, *args)`` in ``world`` fresh processes joined by a gloo process
    group; return each rank's result (None for a rank that died without writing one). A rank that
    writes ``gone_<rank>`` (see :func:`leave`) is not waited for; leftovers are killed at the end."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, str(tmp_path), args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout_s
    while time.time() < deadline and not all(
            not p.is_alive() or (tmp_path / f"result_{r}.pt").exists() or (tmp_path / f"gone_{r}").exists()
            for r, p in enumerate(procs)):
        time.sleep(0.1)
    for r, p in enumerate(procs):
        p.join(0 if (tmp_path / f"gone_{r}").exists() else 5)
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(world):
        path = tmp_path / f"result_{r}.pt"
        results.append(torch.load(path, weights_only=True) if path.exists() else None)
    return results


def leave(rank: int, tmp: str, sig: int) -> None:
    """Leave the process group the hard way: write ``gone_<rank>`` (the time), then send ``sig``
    (SIGKILL: a crash; SIGSTOP: a rank that hangs) to this process."""
    time.sleep(0.5)  # let the previous step's messages reach the peers
    with open(os.path.join(tmp, f"gone_{rank}"), "w") as fh:
        fh.write(repr(time.time()))
    os.kill(os.getpid(), sig)


def assert_no_error(results: List[Dict]) -> None:
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} died without a result"
        assert "error" not in res, f"rank {r}: {res.get('traceback')}"


# --- the QAT run, shared by the ranks and the single-process reference ------------------------
@functools.lru_cache(maxsize=1)
def mnist_train():
    """The vendored MNIST training split (images, labels), read once per process."""
    return load_mnist()[0]


def shard(step: int, rank: int, world: int):
    """The samples of global batch ``step`` that ``rank`` trains on (a contiguous slice)."""
    x, y = mnist_train()
    per = GLOBAL_BATCH // world
    start = step * GLOBAL_BATCH + rank * per
    return x[start:start + per], y[start:start + per]


def ranges(quantizer: QAT_Quantizer) -> Dict[str, List[float]]:
    return {key: [float(v) for v in quantizer.point_ranges[key]] for key in quantizer.point_ranges.keys()}


def train(model: nn.Module, net: nn.Module, quantizer: QAT_Quantizer, optimizer, steps: range, rank: int,
          world: int, on_step: Callable[[int], None] = lambda s: None) -> List[Dict[str, List[float]]]:
    """QAT steps through ``net`` (the DDP wrapper or the model); the ranges after each step."""
    history = []
    model.train()
    for step in steps:
        on_step(step)
        x, y = shard(step, rank, world)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(ranges(quantizer))
    return history


def qat_rank(rank: int, world: int, tmp: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    quantizer = QAT_Quantizer(model, CONFIG, optimizer)  # then wrapped in DDP, as users do
    ddp = nn.parallel.DistributedDataParallel(model)
    history = train(model, ddp, quantizer, optimizer, range(STEPS), rank, world)
    model.eval()
    calibration = quantizer.export_model(os.path.join(tmp, f"model_{rank}.pt"),
                                         os.path.join(tmp, f"calibration_{rank}.json"))
    save_calibration_config(calibration, os.path.join(tmp, f"returned_{rank}.json"))
    shared = load_calibration_config(os.path.join(tmp, "calibration_0.json"))  # rank 0's file, complete now
    from mixq.speedup import ModelSpeedup  # here: the other tests' ranks do not need it
    engine = ModelSpeedup(model, (1, 1, 28, 28), config=shared, backend="onnxruntime")  # every rank builds one
    engine.compress()
    outputs, _ = engine.inference(load_mnist()[1][0][:256])
    return {"history": history, "steps": quantizer.steps, "same_as_file": shared == calibration,
            "weights": {k: v.clone() for k, v in model.state_dict().items()}, "engine_outputs": outputs}


def single_process_qat() -> Dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = MnistNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        quantizer = QAT_Quantizer(model, CONFIG, optimizer)
        history = train(model, model, quantizer, optimizer, range(STEPS), 0, 1)
        model.eval()
        return {"history": history, "calibration": quantizer.calibration_config()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_rank_qat_exports_identical_calibration_equal_to_one_process(tmp_path):
    results = run_ranks(qat_rank, tmp_path)
    assert_no_error(results)
    r0, r1 = results
    # every step, both ranks held the same ranges (bit for bit), and DDP kept the weights identical
    assert r0["history"] == r1["history"]
    assert r0["weights"].keys() == r1["weights"].keys()
    for key, value in r0["weights"].items():
        torch.testing.assert_close(value, r1["weights"][key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert r0["steps"] == r1["steps"] == STEPS
    # only rank 0 wrote files; what every rank returned is byte-identical to rank 0's file
    assert not (tmp_path / "calibration_1.json").exists() and not (tmp_path / "model_1.pt").exists()
    written = (tmp_path / "calibration_0.json").read_bytes()
    assert (tmp_path / "returned_0.json").read_bytes() == written == (tmp_path / "returned_1.json").read_bytes()
    assert r0["same_as_file"] and r1["same_as_file"]
    assert torch.equal(r0["engine_outputs"], r1["engine_outputs"])  # the same engine on every rank
    # a single process on the same global batches: equal up to float summation order
    reference = single_process_qat()
    ranks_calibration = load_calibration_config(str(tmp_path / "calibration_0.json"))
    for step, (mine, ref) in enumerate(zip(r0["history"], reference["history"])):
        assert mine.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(mine[key], ref[key], rtol=1e-5, atol=1e-7, msg=f"step {step} {key}")
    ref_cal = reference["calibration"]
    assert ranks_calibration.keys() == ref_cal.keys()
    for layer, entry in ref_cal.items():
        if layer.startswith("@"):
            continue
        torch.testing.assert_close(torch.tensor(ranks_calibration[layer]["weight_scale"]),
                                   torch.tensor(entry["weight_scale"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(ranks_calibration[layer]["tracked_max_input"], entry["tracked_max_input"],
                                   rtol=1e-5, atol=1e-7)


# --- setup errors -----------------------------------------------------------------------------
def test_dataparallel_is_refused_pointing_to_ddp():
    model = MnistNet()
    with pytest.raises(ConfigError, match="DataParallel.*DistributedDataParallel"):
        QAT_Quantizer(nn.DataParallel(model), CONFIG)
    assert not any(isinstance(m, QuantizerModuleWrapper) for m in model.modules())


def test_distributed_true_needs_a_process_group():
    assert not dist.is_initialized()
    model = MnistNet()
    with pytest.raises(DistributedSetupError, match="init_process_group"):
        QAT_Quantizer(model, CONFIG, distributed=True)
    assert not any(isinstance(m, QuantizerModuleWrapper) for m in model.modules())


def ddp_wrapped_rank(rank: int, world: int, tmp: str) -> Dict[str, Any]:
    torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
    model = MnistNet()
    ddp = nn.parallel.DistributedDataParallel(model)
    records: List[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mixq").addHandler(handler)
    logging.getLogger("mixq").setLevel(logging.INFO)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    quantizer = QAT_Quantizer(ddp, CONFIG, optimizer)  # a model already wrapped in DDP
    history = train(model, ddp, quantizer, optimizer, range(3), rank, world)
    return {"log": [r.getMessage() for r in records], "history": history,
            "inner_wrapped": isinstance(ddp.module.conv1, QuantizerModuleWrapper),
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.slow
def test_model_already_wrapped_in_ddp_quantizes_its_inner_module(tmp_path):
    r0, r1 = run_ranks(ddp_wrapped_rank, tmp_path)
    assert_no_error([r0, r1])
    for res in (r0, r1):
        assert res["inner_wrapped"]
        assert any("DistributedDataParallel" in line and "model.module" in line for line in res["log"])
    assert r0["history"] == r1["history"]  # the same ranges at every step
    for key, value in r0["weights"].items():  # DDP keeps weights (and the quantizer's buffers) identical
        torch.testing.assert_close(value, r1["weights"][key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert "conv1.qat_steps" in r0["weights"] and "conv1.quant_start_step" in r0["weights"]
    assert int(r0["weights"]["conv1.qat_steps"]) == 3


# --- a rank dies ------------------------------------------------------------------------------
LEAVE = {"killed in training": ("training", signal.SIGKILL), "killed before export": ("export", signal.SIGKILL),
         "hangs in training": ("training", signal.SIGSTOP)}


def leaving_rank(rank: int, world: int, tmp: str, how: str) -> Dict[str, Any]:
    """QAT for 6 steps, then export; rank 1 leaves at step 3 or just before the export."""
    when, sig = LEAVE[how]
    torch.manual_seed(0)
    model = MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    quantizer = QAT_Quantizer(model, CONFIG, optimizer)
    ddp = nn.parallel.DistributedDataParallel(model)

    def maybe_leave(step: int) -> None:
        if rank == 1 and when == "training" and step == 3:
            leave(rank, tmp, sig)

    train(model, ddp, quantizer, optimizer, range(6), rank, world, maybe_leave)
    if rank == 1 and when == "export":
        leave(rank, tmp, sig)
    model.eval()
    quantizer.export_model(os.path.join(tmp, "out", "model.pt"), os.path.join(tmp, "out", "calibration.json"))
    return {"exported": True}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(LEAVE))
def test_lost_rank_survivor_fails_clearly_and_exports_nothing(tmp_path, how):
    (tmp_path / "out").mkdir()
    r0, r1 = run_ranks(leaving_rank, tmp_path, args=(how,), timeout_s=120)
    assert r1 is None  # killed (a hanging rank is killed by run_ranks at the end)
    assert r0 is not None and r0.get("error") == "RankLostError", r0
    assert "a rank was lost during range synchronisation" in r0["message"]
    waited = r0["time"] - float((tmp_path / "gone_1").read_text())
    if LEAVE[how][1] == signal.SIGKILL:
        assert waited < 5  # the peer's sockets close: gloo notices at once
    else:
        assert PG_TIMEOUT_S - 1 < waited < PG_TIMEOUT_S + 5  # a silent peer: the process group's timeout
    assert list((tmp_path / "out").iterdir()) == []  # no file, no temp file


# --- resume from a rank-0 checkpoint ----------------------------------------------------------
RESUME_AT = 4
RESUME_CONFIG = [dict(entry, quant_start_step=RESUME_AT) for entry in CONFIG]  # quantized from the resumed step on


def checkpoint_rank(rank: int, world: int, tmp: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    quantizer = QAT_Quantizer(model, RESUME_CONFIG, optimizer)
    ddp = nn.parallel.DistributedDataParallel(model)
    train(model, ddp, quantizer, optimizer, range(RESUME_AT), rank, world)
    if rank == 0:
        torch.save({"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict()},
                   os.path.join(tmp, "checkpoint.pt"))
    dist.barrier()
    return {}


def resumed_step(rank: int, world: int, checkpoint: str) -> Dict[str, Any]:
    """One QAT step from ``checkpoint``: the scales in effect during it (observed in the forward)."""
    torch.manual_seed(123)  # weights come from the checkpoint
    model = MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    quantizer = QAT_Quantizer(model, RESUME_CONFIG, optimizer)
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    steps_loaded = quantizer.steps
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    model.train()
    x, y = shard(RESUME_AT, rank, world)
    loss = F.cross_entropy(net(x), y)
    scales = ranges(quantizer)  # in effect during this step's forward
    calibration = quantizer.calibration_config()
    scales.update({f"{n}.weight_scale": calibration[n]["weight_scale"] for n in quantizer.modules_wrapper})
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"steps_loaded": steps_loaded, "scales": scales, "steps": quantizer.steps}


def resume_rank(rank: int, world: int, tmp: str) -> Dict[str, Any]:
    return resumed_step(rank, world, os.path.join(tmp, "..", "checkpoint.pt"))


@pytest.mark.slow
def test_resume_from_rank0_checkpoint_on_one_and_two_ranks(tmp_path):
    assert_no_error(run_ranks(checkpoint_rank, tmp_path))
    (tmp_path / "two").mkdir()
    two = run_ranks(resume_rank, tmp_path / "two")
    assert_no_error(two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = resumed_step(0, 1, str(tmp_path / "checkpoint.pt"))
    finally:
        torch.set_num_threads(threads)
    for res in [one] + two:
        assert res["steps_loaded"] == RESUME_AT and res["steps"] == RESUME_AT + 1
    # the scales of the resumed step come from the checkpoint's weights and ranges and the min/max
    # of the union batch: the same on 1 rank as on 2 (measured bit-identical; a conv that rounds
    # differently at batch 32 and 64 could move a last bit)
    assert two[0]["scales"] == two[1]["scales"]
    assert one["scales"].keys() == two[0]["scales"].keys()
    for key, value in one["scales"].items():
        torch.testing.assert_close(torch.tensor(two[0]["scales"][key]), torch.tensor(value), rtol=1e-6, atol=0,
                                   msg=key)


# --- the example ------------------------------------------------------------------------------
@pytest.mark.slow
def test_mnist_ddp_example_under_torchrun(tmp_path):
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "examples" / "mnist_ddp.py"), "--steps", "30", "--backend", "onnxruntime",
           "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # rank, steps, train s, QAT acc, engine acc, calibration sha256, = rank 0 file
    rows = [line.split() for line in result.stdout.splitlines() if line[:2] in ("0 ", "1 ")]
    assert [r[0] for r in rows] == ["0", "1"], result.stdout
    for row in rows:
        assert row[1] == "30" and row[6] == "yes"
    assert rows[0][3:6] == rows[1][3:6]  # the same accuracies and calibration on both ranks
    assert (tmp_path / "out" / "calibration.json").exists()


# --- the checkpoint, in one process -----------------------------------------------------------
def test_checkpoint_loads_before_placement_and_checks_quant_start_step():
    """Without dummy_input the tensors are placed on the first forward: a checkpoint loaded before
    it keeps their ranges until then. A checkpoint of another quant_start_step is refused."""
    x = mnist_train()[0][:64]
    torch.manual_seed(0)
    model = MnistNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    quantizer = QAT_Quantizer(model, CONFIG, optimizer)
    train(model, model, quantizer, optimizer, range(2), 0, 1)
    state = model.state_dict()
    restored = MnistNet()
    resumed = QAT_Quantizer(restored, CONFIG)
    restored.load_state_dict(state)
    assert resumed.steps == 2
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)  # placement, then the saved ranges
    assert ranges(resumed) == ranges(quantizer)
    later = MnistNet()
    QAT_Quantizer(later, RESUME_CONFIG)
    with pytest.raises(ConfigError, match="quant_start_step=0, the config list says 4"):
        later.load_state_dict(state)
