"""MNIST mixed-precision speedup: fp32 vs mixed vs int8, QAT and PTQ, on a real engine.

Trains NNI's MNIST model, quantizes it three ways along both paths, builds an engine for
each on the chosen backend and prints: average bits, latency per batch, speedup over the
fp32 engine, accuracy, ONNX size and the per-layer precision that actually ran.

  python3 examples/mnist_speedup.py                        # ~20 s on 2 CPU cores
  python3 examples/mnist_speedup.py --quick                # ~10 s, for CI
  python3 examples/mnist_speedup.py --data-dir ~/data      # torchvision layout; downloads if missing

Without --data-dir (or $MIXQ_DATA) it uses the official MNIST test set vendored in
mixq/data, split 8,000 train / 2,000 test.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speedup_runner import ExampleSpec, build_parser, main_guard, run_example, start  # noqa: E402

from mixq.datasets import DatasetNotFound, download_mnist, load_mnist, read_mnist_split  # noqa: E402
from mixq.models import MnistNet  # noqa: E402

INT8 = [
    {"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]
MIXED = [
    {"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1", "conv2"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2"]},
    {"quant_types": ["weight"], "quant_bits": 16, "op_names": ["fc1"]},  # fp16 where the backend has it
]                                                                          # fc2 stays fp32


def load_data(data_dir, no_download):
    """MNIST from data_dir (downloading when it holds none), else the vendored copy."""
    if data_dir is not None:
        try:
            read_mnist_split(data_dir, "t10k")
        except DatasetNotFound:
            if no_download or not download_mnist(data_dir):
                print(f"MNIST not found under {data_dir} and not downloadable here; "
                      "falling back to the copy vendored in mixq/data")
                data_dir = None
    train, test, source = load_mnist(data_dir)
    print(f"MNIST: {len(train[0])} train / {len(test[0])} test images from {source}")
    return train, test


def main() -> int:
    parser = build_parser(__doc__.splitlines()[0], epochs=3, quick_note="1 epoch, short QAT, few timing runs (~10 s)")
    args = start(parser)
    train, test = load_data(args.data_dir, args.no_download)
    spec = ExampleSpec(name="mnist", make_model=MnistNet, input_shape=(1, 1, 28, 28),
                       configs={"mixed": MIXED, "int8": INT8}, lr=0.02, qat_lr=0.002)
    if args.quick:
        args.epochs = 1
    run_example(spec, args, train, test, qat_steps=60 if args.quick else 250, calib_batches=8,
                runs=args.runs or (30 if args.quick else 100), fp32_steps=None)
    return 0


if __name__ == "__main__":
    main_guard(main)
