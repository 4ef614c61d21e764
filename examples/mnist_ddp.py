"""MNIST QAT with DistributedDataParallel: every rank trains on its shard, one calibration.

  torchrun --nproc-per-node 2 examples/mnist_ddp.py     # gloo on CPUs, nccl where CUDA is available
  python3 examples/mnist_ddp.py                         # one process, the same code path

Every rank builds QAT_Quantizer on NNI's MNIST model, wraps it in DistributedDataParallel and
trains on its slice of each global batch (activation ranges are all-reduced at every step, DDP
averages the gradients). Rank 0 writes the export; every rank then reads rank 0's calibration
file, builds an engine from it and measures its accuracy. Rank 0 prints one row per rank: steps,
QAT accuracy (PyTorch simulation), engine accuracy, and the SHA-256 of the calibration the rank
holds: identical rows are the point.
"""
import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mixq.compressor import load_calibration_config
from mixq.compressor.distributed import digest
from mixq.datasets import load_mnist
from mixq.models import MnistNet, accuracy
from mixq.quantizers import QAT_Quantizer
from mixq.speedup import ModelSpeedup
from mixq.table import format_table

CONFIG = [
    {"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="global QAT steps (default 300)")
    parser.add_argument("--global-batch", type=int, default=128, help="samples per step over all ranks")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", default="mnist_ddp_out", help="where rank 0 writes model.pt and calibration.json")
    parser.add_argument("--backend", default="auto",
                        help="the engine's (and the placement's) backend: auto, onnxruntime, tensorrt")
    return parser.parse_args()


def setup() -> torch.device:
    """Join the process group torchrun describes (none without torchrun); the device of this rank."""
    if "RANK" not in os.environ:
        return torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        return torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main() -> None:
    args = parse_args()
    device = setup()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} ranks")
    (train_x, train_y), (test_x, test_y), _ = load_mnist()
    torch.manual_seed(0)
    model = MnistNet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    quantizer = QAT_Quantizer(model, CONFIG, optimizer, backend=args.backend)  # distributed: a process group is up
    net = DistributedDataParallel(model) if world > 1 else model

    per_rank, batches = args.global_batch // world, len(train_x) // args.global_batch
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))  # the same on every rank
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        first = (step % batches) * args.global_batch + rank * per_rank
        idx = order[first:first + per_rank]  # this rank's slice of global batch `step`
        loss = F.cross_entropy(net(train_x[idx].to(device)), train_y[idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start

    qat_acc = accuracy(model, test_x.to(device), test_y.to(device))
    out = Path(args.out)
    calibration = quantizer.export_model(str(out / "model.pt"), str(out / "calibration.json"))
    shared = load_calibration_config(str(out / "calibration.json"))  # rank 0's file: complete on every rank now
    engine = ModelSpeedup(model, (1, 1, 28, 28), config=shared, backend=args.backend, batchsize=128)
    engine.compress()
    output, _ = engine.inference(test_x)
    engine_acc = 100.0 * (output.argmax(1) == test_y).float().mean().item()

    row = [rank, quantizer.steps, f"{train_s:.1f}", f"{qat_acc:.2f}%", f"{engine_acc:.2f}%",
           digest(calibration)[:16], "yes" if shared == calibration else "NO"]
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if rank == 0:
        backend = dist.get_backend() if dist.is_initialized() else "none (1 process)"
        print(f"MNIST QAT on {world} rank(s), process group backend: {backend}, global batch {args.global_batch}, "
              f"engine backend: {engine.backend_name}; calibration written to {out / 'calibration.json'}")
        print(format_table(["rank", "steps", "train s", "QAT acc", "engine acc", "calibration sha256",
                            "= rank 0 file"], rows))
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them (gloo aborted at exit once)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
