"""``ipmcondense generator``: train a small class-conditional generator (the prior of GLaD / IT-GAN rows).

.. code-block:: console

    ipmcondense generator --kind gan --dataset digits --out gens/digits-gan
    ipmcondense generator --kind gan --dataset mnist --data-root data --epochs 5 --out gens/mnist-gan
    ipmcondense condense --method glad --dataset digits --ipc 10 --generator gens/digits-gan --out runs/glad

Writes ``generator.pt``, ``checkpoint.pt`` (every epoch; ``--resume`` continues it), ``samples.png`` (one row
per class) and ``metrics.json``, all atomically. The summary is printed as one JSON object on stdout:
``{"out", "kind", "dataset", "epochs", "seconds", "quality"}`` where ``quality`` holds the unbiased Gaussian
MMD^2 between generated and test images in a fixed, seeded, untrained ConvNet-3 embedding, next to the same
score between real training and test images (the floor).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "run_generator", "run_dim"]


def register(subparsers: Any) -> None:
    """Add the ``generator`` subcommand to the CLI's ``subparsers``."""
    from ipmcondense.generators import GENERATOR_KINDS

    p = subparsers.add_parser(
        "generator",
        help="train a small class-conditional generator (for --synthetic latent: GLaD, IT-GAN)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kind", choices=GENERATOR_KINDS, default="gan",
                   help="gan: DCGAN-style generator, projection discriminator with spectral norm, hinge loss")
    p.add_argument("--dataset", required=True,
                   help="dataset name (digits, mnist, fashion-mnist, cifar10, ...), imagefolder:PATH or a .npz/.pt file")
    p.add_argument("--out", required=True, help="run directory (created)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 50 for digits, 5 for mnist / fashion-mnist, 50 otherwise)")
    p.add_argument("--data-root", default=None, help="folder holding the torchvision datasets")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize and centre-crop the dataset's images to NxN")
    p.add_argument("--latent-dim", type=int, default=64, help="latent dimension (default 64)")
    p.add_argument("--width", type=int, default=32, help="channels of the networks' narrowest block (default 32)")
    p.add_argument("--batch-size", type=int, default=64, help="real images per step (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam step of both networks (default 2e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_generator)

    d = subparsers.add_parser(
        "dim",
        help="DiM: fine-tune a trained GAN with logit matching over a pool of models (sample any IPC afterwards)",
        description="DiM stage 2 (Wang et al. 2023): fine-tune the generator of a `generator --kind gan` run with its "
                    "discriminator plus logit matching against classifiers trained along the way; writes a generator "
                    "run directory. Evaluate it with `ipmcondense evaluate OUT --ipc N`.",
    )
    d.add_argument("--generator", required=True, metavar="DIR", help="the stage-1 run (`ipmcondense generator --kind gan`)")
    d.add_argument("--dataset", required=True, help="the dataset the generator was trained on")
    d.add_argument("--out", required=True, help="run directory (created)")
    d.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10; DiM uses 100)")
    d.add_argument("--lr", type=float, default=5e-6, help="Adam step of both networks (default 5e-6, DiM)")
    d.add_argument("--match-weight", type=float, default=0.01, help="weight of the logit matching term (default 0.01)")
    d.add_argument("--match-train-steps", type=int, default=16,
                   help="SGD steps of the match model on real data per generator step (default 16)")
    d.add_argument("--pool", nargs="+", default=["convnet"], metavar="ARCH", help="architectures of the model pool")
    d.add_argument("--data-root", default=None, help="folder holding the torchvision datasets")
    d.add_argument("--image-size", type=int, default=None, metavar="N", help="resize the dataset's images to NxN")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run in OUT")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    d.set_defaults(func=run_dim)


def run_dim(args: argparse.Namespace) -> int:
    """DiM's stage 2 on a trained GAN; prints the JSON summary; returns 0."""
    from ipmcondense.commands._common import resolve_device
    from ipmcondense.data import load_dataset
    from ipmcondense.generators import distill_into_generator

    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, args.data_root, image_size=args.image_size)
    run = distill_into_generator(
        dataset, args.generator, args.out, epochs=args.epochs, lr=args.lr, match_weight=args.match_weight,
        match_train_steps=args.match_train_steps, pool_archs=args.pool, seed=args.seed, device=device,
        progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite,
    )
    m = run.metrics
    print(json.dumps({"out": str(run.out), "method": "dim", "dataset": m["dataset"], "epochs": m["epochs"],
                      "seconds": round(m["seconds"], 3), "quality": m["quality"]}))
    return 0


def run_generator(args: argparse.Namespace) -> int:
    """Load the dataset, train (or resume) the generator and print the JSON summary; returns 0."""
    from ipmcondense.commands._common import resolve_device
    from ipmcondense.data import load_dataset
    from ipmcondense.generators import train_generator

    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, args.data_root, image_size=args.image_size)
    run = train_generator(
        dataset, args.out, kind=args.kind, epochs=args.epochs, latent_dim=args.latent_dim, width=args.width,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device, progress=not args.no_progress,
        resume=args.resume, overwrite=args.overwrite,
    )
    m = run.metrics
    print(json.dumps({"out": str(run.out), "kind": m["kind"], "dataset": m["dataset"], "epochs": m["epochs"],
                      "seconds": round(m["seconds"], 3), "quality": m["quality"]}))
    return 0
