"""KRR test accuracy of MNIST IPC-10 sets in KIP's own kernel (the FC NTK), next to the ConvNet protocol.

KIP optimises its images for kernel ridge regression with the fully connected NTK; the benchmark
grid evaluates every set by training a ConvNet. This script measures the other side: the test
accuracy of the KRR predictor K_test,S (K_SS + lambda I)^-1 Y_S (lambda = 1e-6 tr(K_SS)/|S|) for the
random real selection and for the KIP sets of the cpu-small (100 iterations) and cpu-hour (2000)
cells. It reads the cells' run folders, so run those cells first::

    python benchmarks/condense.py --profile cpu-small --datasets mnist --methods random kip --ipc 10 --data-root DATA
    python benchmarks/condense.py --profile cpu-hour --datasets mnist --methods kip --ipc 10 --data-root DATA
    python benchmarks/kip_kernel_accuracy.py --data-root DATA

Output: benchmarks/results/kip_kernel_accuracy.json (written atomically). Cost: two 10000 x 100
kernel blocks per set, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SETS = {
    "random (cpu-small)": "cpu-small/mnist/random-ipc10",
    "kip, 100 iterations (cpu-small)": "cpu-small/mnist/kip-ipc10",
    "kip, 2000 iterations (cpu-hour)": "cpu-hour/mnist/kip-ipc10",
}


def main() -> None:
    from ipmcondense.data import load_dataset
    from ipmcondense.ipm.kernel_regression import centred_one_hot, kernel_ridge_predict
    from ipmcondense.ipm.neural_kernels import FullyConnectedNTK

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("IPMCONDENSE_DATA_ROOT"))
    p.add_argument("--runs-dir", type=Path, default=ROOT.parent / "runs" / "benchmarks")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "kip_kernel_accuracy.json")
    args = p.parse_args()

    ds = load_dataset("mnist", args.data_root)
    x_test = ds.test_images.float().reshape(len(ds.test_images), -1)
    kernel = FullyConnectedNTK(depth=1)  # the kip recipe's default kernel ("fc_ntk", kernel_depth 1)
    rows = {}
    for name, folder in SETS.items():
        saved = torch.load(args.runs_dir / folder / "synthetic.pt", weights_only=False)
        support = saved["images"].float().reshape(len(saved["images"]), -1)
        targets = centred_one_hot(saved["labels"], ds.num_classes, dtype=torch.float64)
        pred = kernel_ridge_predict(kernel(x_test, support).double(), kernel(support, support).double(), targets,
                                    reg=1e-6)
        rows[name] = {"krr_test_accuracy": float((pred.argmax(1) == ds.test_labels).float().mean()),
                      "run_folder": folder}
        print(f"{name:35s} {100 * rows[name]['krr_test_accuracy']:.2f}%", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
        json.dump({"kernel": "fc_ntk depth 1", "reg": 1e-6, "sets": rows}, f, indent=1)
    os.replace(f.name, args.out)


if __name__ == "__main__":
    main()
