"""Time of one QAT training step vs one plain fp32 step (MNIST model, batch 64), same run.

Prints the median of many interleaved steps for both and their ratio (target <= 1.5x).
Usage: python benchmarks/qat_overhead.py [--steps 200] [--batch-size 64] [--threads 2]
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mixq.models import MnistNet
from mixq.quantizers import QAT_Quantizer

CONFIG = [
    {"quant_types": ["weight", "input"], "quant_bits": {"weight": 8, "input": 8}, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ["ReLU6"]},
]


def step_time(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    fp32 = MnistNet().train()
    qat = copy.deepcopy(fp32)
    opt_fp32 = torch.optim.SGD(fp32.parameters(), lr=0.01, momentum=0.9)
    opt_qat = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    QAT_Quantizer(qat, CONFIG, opt_qat).compress()
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    for _ in range(10):  # warm-up
        step_time(fp32, opt_fp32, x, y)
        step_time(qat, opt_qat, x, y)
    times = {"fp32": [], "qat": []}
    for _ in tqdm(range(args.steps), desc="timing steps"):
        times["fp32"].append(step_time(fp32, opt_fp32, x, y))
        times["qat"].append(step_time(qat, opt_qat, x, y))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"\nMNIST model, batch {args.batch_size}, {args.threads} threads, median of {args.steps} steps")
    print(f"{'step':<10}{'median ms':>12}{'ratio':>8}")
    print(f"{'fp32':<10}{med['fp32']:>12.2f}{1.0:>8.2f}")
    print(f"{'QAT int8':<10}{med['qat']:>12.2f}{med['qat'] / med['fp32']:>8.2f}")


if __name__ == "__main__":
    main()
