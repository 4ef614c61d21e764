"""CIFAR-10 ResNet-18 mixed-precision speedup: fp32 vs mixed vs int8, QAT and PTQ, on a real engine.

The standard CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool). Reads the python-pickle
CIFAR-10 layout (``cifar-10-batches-py``) from --data-dir (default: $MIXQ_DATA), using whichever
training batches it holds; downloads the archive when the folder is missing and a network exists.

  python3 examples/cifar_speedup.py --data-dir ../shared/data           # ~15 min on 2 CPU cores (10,000 images)
  python3 examples/cifar_speedup.py --data-dir ../shared/data --quick   # ~1 min, for CI
"""
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speedup_runner import ExampleSpec, build_parser, main_guard, run_example, start  # noqa: E402

from mixq.datasets import DatasetNotFound, cifar_dir, load_cifar10  # noqa: E402
from mixq.models import resnet18_cifar  # noqa: E402

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# which layers at which bits, nothing more: the backend places the Q/DQ the integer kernels need
# (the residual Adds, the ReLUs fused into the convs, the pooling before the classifier)
INT8 = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
MIXED = INT8 + [
    {"quant_types": ["weight", "input"], "quant_bits": 16, "op_names": ["conv1", "fc"]},  # stem and classifier in fp16
    {"exclude": True, "op_names": [f"layer1.{b}.conv{i}" for b in (0, 1) for i in (1, 2)]},  # stage 1 in fp32
]


def download_cifar(root: str) -> bool:
    """Fetch and unpack the python version of CIFAR-10 into ``root``; False on any failure."""
    try:
        with urllib.request.urlopen(CIFAR_URL, timeout=10) as response, tempfile.TemporaryFile() as tmp:
            tmp.write(response.read())
            tmp.seek(0)
            with tarfile.open(fileobj=tmp, mode="r:gz") as archive:
                archive.extractall(root, filter="data")
    except (OSError, tarfile.TarError) as exc:
        print(f"CIFAR-10 download failed: {exc}")
        return False
    return True


def load_data(data_dir, no_download):
    if data_dir is None:
        raise FileNotFoundError("--data-dir (or $MIXQ_DATA) is required: a folder holding cifar-10-batches-py "
                                "(e.g. --data-dir ../shared/data)")
    try:
        return load_cifar10(data_dir)
    except DatasetNotFound as exc:
        if no_download or cifar_dir(data_dir).exists() or not download_cifar(data_dir):
            raise FileNotFoundError(f"{exc}; download it or point --data-dir at a copy") from None
        return load_cifar10(data_dir)


def main() -> int:
    parser = build_parser(__doc__.splitlines()[0], epochs=3,
                          quick_note="3 training steps, 2 QAT steps, 256 test images, few timing runs (~1 min)")
    args = start(parser)
    train, test = load_data(args.data_dir, args.no_download)
    if args.quick:
        test = (test[0][:256], test[1][:256])
    print(f"CIFAR-10: {len(train[0])} train / {len(test[0])} test images")
    spec = ExampleSpec(name="cifar", make_model=resnet18_cifar, input_shape=(1, 3, 32, 32),
                       configs={"mixed": MIXED, "int8": INT8}, lr=0.05, qat_lr=0.002)
    run_example(spec, args, train, test, qat_steps=2 if args.quick else 150, calib_batches=4 if args.quick else 16,
                runs=args.runs or (3 if args.quick else 20), fp32_steps=3 if args.quick else None)
    return 0


if __name__ == "__main__":
    main_guard(main)
