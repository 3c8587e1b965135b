"""``ipmcondense experts``: train expert trajectories (the buffer MTT-type recipes match against).

.. code-block:: console

    ipmcondense experts --dataset digits --n-experts 2 --epochs 5 --out buffers/digits-convnet
    ipmcondense experts --dataset cifar10 --n-experts 100 --epochs 50 --out buffers/c10 --device cuda

Rerunning with the same ``--out`` resumes: complete experts are kept, missing or damaged ones are
(re)trained, and a larger ``--n-experts`` extends the buffer. The summary is printed as one JSON
object on stdout: ``{"out_dir", "dataset", "arch", "epochs", "num_params", "n_experts", "trained",
"skipped", "retrained_corrupt", "test_accuracy", "seconds", "size_bytes"}``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "run_experts"]


def register(subparsers: Any) -> None:
    """Add the ``experts`` subcommand to the CLI's ``subparsers``."""
    p = subparsers.add_parser(
        "experts",
        help="train expert trajectories (SGD on real data, parameters saved every epoch) for MTT-type recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True,
                   help="dataset name (digits, mnist, fashion-mnist, cifar10, ...), imagefolder:PATH or a .npz/.pt file")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize and centre-crop the dataset's images to NxN (needed for folders of mixed sizes)")
    p.add_argument("--n-experts", type=int, required=True, help="number of experts the buffer should hold")
    p.add_argument("--epochs", type=int, required=True, help="training epochs per expert (epochs + 1 snapshots)")
    p.add_argument("--out", required=True, help="buffer directory (created; reused to resume)")
    p.add_argument("--arch", default="convnet", help="network name (default convnet)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD step size, no momentum/weight decay (default 0.01)")
    p.add_argument("--batch-size", type=int, default=256, help="real mini-batch size (default 256)")
    p.add_argument("--no-augment", action="store_true", help="train without DSA augmentation")
    p.add_argument("--zca", action="store_true",
                   help="train on ZCA-whitened data (MTT buffer.py --zca; for MTT runs with zca=true)")
    p.add_argument("--zca-eps", type=float, default=0.1, help="ZCA regulariser with --zca (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--data-root", default=None, help="folder holding the torchvision datasets")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_experts)


def run_experts(args: argparse.Namespace) -> int:
    """Load the dataset, train (or resume) the buffer and print the JSON summary; returns 0."""
    from ipmcondense.commands._common import resolve_device
    from ipmcondense.data import load_dataset
    from ipmcondense.trajectories import train_experts

    resolve_device(args.device)
    dataset = load_dataset(args.dataset, args.data_root, image_size=args.image_size)
    report = train_experts(
        dataset,
        n_experts=args.n_experts,
        epochs=args.epochs,
        out_dir=args.out,
        arch=args.arch,
        lr=args.lr,
        batch_size=args.batch_size,
        augment=not args.no_augment,
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
        zca_eps=args.zca_eps if args.zca else None,
    )
    summary = report.to_dict()
    summary["seconds"] = round(summary["seconds"], 3)
    print(json.dumps(summary))
    return 0
