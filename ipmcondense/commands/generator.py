"""``ipmcondense generator``: train a small class-conditional generator (the prior of GLaD / IT-GAN rows).

.. code-block:: console

    ipmcondense generator --kind gan --dataset digits --out gens/digits-gan
    ipmcondense generator --kind gan --dataset mnist --data-root data --epochs 5 --out gens/mnist-gan
    ipmcondense condense --method glad --dataset digits --ipc 10 --generator gens/digits-gan --out runs/glad
    ipmcondense generator --kind diffusion --dataset digits --out gens/digits-ddpm
    ipmcondense minimax --generator gens/digits-ddpm --dataset digits --out gens/digits-minimax
    ipmcondense evaluate gens/digits-minimax --ipc 10 --models 3

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

__all__ = ["register", "run_generator", "run_dim", "run_minimax"]


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
                   help="gan: DCGAN-style generator, projection discriminator with spectral norm, hinge loss; "
                        "diffusion: class-conditional DDPM (small U-Net, epsilon prediction, DDIM sampling)")
    p.add_argument("--dataset", required=True,
                   help="dataset name (digits, mnist, fashion-mnist, cifar10, ...), imagefolder:PATH or a .npz/.pt file")
    p.add_argument("--out", required=True, help="run directory (created)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (gan: 50 for digits, 5 for mnist / fashion-mnist, 50 otherwise; "
                        "diffusion: 100 for digits, 2 for mnist / fashion-mnist, 100 otherwise)")
    p.add_argument("--data-root", default=None, help="folder holding the torchvision datasets")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize and centre-crop the dataset's images to NxN")
    p.add_argument("--latent-dim", type=int, default=64, help="latent dimension of the GAN (default 64)")
    p.add_argument("--width", type=int, default=32, help="channels of the networks' narrowest block (default 32)")
    p.add_argument("--batch-size", type=int, default=64, help="real images per step (default 64)")
    p.add_argument("--lr", type=float, default=None, help="Adam step (default 2e-4 for gan, 1e-3 for diffusion)")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion: noise levels T (default 1000)")
    p.add_argument("--schedule", choices=("linear", "cosine"), default="linear", help="diffusion: beta schedule")
    p.add_argument("--sample-steps", type=int, default=25, help="diffusion: DDIM steps per sample (default 25)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="diffusion: classifier-free guidance weight of sampling (default 1: none)")
    p.add_argument("--class-dropout", type=float, default=0.1,
                   help="diffusion: probability of training with the null class (default 0.1)")
    p.add_argument("--ema-decay", type=float, default=0.995, help="diffusion: EMA decay of the weights (default 0.995)")
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

    m = subparsers.add_parser(
        "minimax",
        help="minimax diffusion: fine-tune a trained diffusion generator with the representativeness and diversity "
             "terms (sample any IPC afterwards)",
        description="Minimax diffusion (Gu et al. 2024): fine-tune the model of a `generator --kind diffusion` run "
                    "with its diffusion loss plus the representativeness term (predicted x0 pulled towards the least "
                    "similar real image of a per-class memory) and the diversity term (pushed away from the most "
                    "similar earlier prediction); writes a generator run directory. Evaluate it with "
                    "`ipmcondense evaluate OUT --ipc N`.",
    )
    m.add_argument("--generator", required=True, metavar="DIR", help="the stage-1 run (`ipmcondense generator --kind diffusion`)")
    m.add_argument("--dataset", required=True, help="the dataset the generator was trained on")
    m.add_argument("--out", required=True, help="run directory (created)")
    m.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (default 8, as the official run.sh)")
    m.add_argument("--lr", type=float, default=1e-3, help="AdamW step (default 1e-3, official)")
    m.add_argument("--lambda-pos", type=float, default=0.002, help="weight of the representativeness term (0.002)")
    m.add_argument("--lambda-neg", type=float, default=0.008, help="weight of the diversity term (0.008)")
    m.add_argument("--memory-size", type=int, default=64, help="memory bank size per class (default 64)")
    m.add_argument("--trainable", choices=("difffit", "all"), default="difffit",
                   help="difffit: biases, norms and the class embedding (official); all: every weight")
    m.add_argument("--batch-size", type=int, default=None, help="real images per step (default: the stage-1 run's)")
    m.add_argument("--data-root", default=None, help="folder holding the torchvision datasets")
    m.add_argument("--image-size", type=int, default=None, metavar="N", help="resize the dataset's images to NxN")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    m.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    m.add_argument("--overwrite", action="store_true", help="replace an existing run in OUT")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    m.set_defaults(func=run_minimax)


def run_minimax(args: argparse.Namespace) -> int:
    """Minimax fine-tuning of a trained diffusion generator; prints the JSON summary; returns 0."""
    from ipmcondense.commands._common import resolve_device
    from ipmcondense.data import load_dataset
    from ipmcondense.generators import minimax_finetune

    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, args.data_root, image_size=args.image_size)
    run = minimax_finetune(
        dataset, args.generator, args.out, epochs=args.epochs, lr=args.lr, lambda_pos=args.lambda_pos,
        lambda_neg=args.lambda_neg, memory_size=args.memory_size, trainable=args.trainable,
        batch_size=args.batch_size, seed=args.seed, device=device, progress=not args.no_progress,
        resume=args.resume, overwrite=args.overwrite,
    )
    m = run.metrics
    print(json.dumps({"out": str(run.out), "method": "minimax", "dataset": m["dataset"], "epochs": m["epochs"],
                      "seconds": round(m["seconds"], 3), "quality": m["quality"]}))
    return 0


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
        resume=args.resume, overwrite=args.overwrite, timesteps=args.timesteps, schedule=args.schedule,
        sample_steps=args.sample_steps, guidance=args.guidance, class_dropout=args.class_dropout,
        ema_decay=args.ema_decay,
    )
    m = run.metrics
    print(json.dumps({"out": str(run.out), "kind": m["kind"], "dataset": m["dataset"], "epochs": m["epochs"],
                      "seconds": round(m["seconds"], 3), "quality": m["quality"]}))
    return 0
