"""CLI subcommands ``condense``, ``evaluate`` and ``methods`` (thin wrappers over :mod:`ipmcondense.condensation.api`).

.. code-block:: console

    ipmcondense condense --method dm --dataset digits --ipc 10 --out runs/digits-dm-ipc10
    ipmcondense evaluate runs/digits-dm-ipc10 --models 3
    ipmcondense condense --method dc --discrepancy mmd2 --sampler fresh --out runs/new-method
    ipmcondense methods --json
    ipmcondense experts --dataset digits --arch convnet-d2 --n-experts 5 --epochs 20 --out buffers/digits
    ipmcondense condense --method mtt --experts buffers/digits --out runs/digits-mtt
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any

from ipmcondense.distributed import is_rank_zero

__all__ = ["register", "run_condense", "run_evaluate", "run_methods", "methods_table"]


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip().replace("-", "_"), value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``condense``, ``evaluate`` and ``methods`` to the ``ipmcondense`` parser."""
    from ipmcondense.condensation.discrepancies import DISCREPANCY_ALIASES, DISCREPANCY_NAMES
    from ipmcondense.condensation.real_batches import REAL_BATCH_NAMES
    from ipmcondense.condensation.recipes import AUGMENTATION_NAMES, METHOD_NAMES
    from ipmcondense.condensation.samplers import SAMPLER_NAMES
    from ipmcondense.condensation.synthetic import SYNTHETIC_NAMES
    from ipmcondense.features import FEATURE_MAP_NAMES

    p = subparsers.add_parser(
        "condense",
        help="condense a dataset with a recipe (writes synthetic.pt, metrics.json, synthetic.png)",
        description="Condense a dataset into IPC images per class by minimising an IPM-type loss. "
        f"Methods: {', '.join(METHOD_NAMES)}.",
    )
    p.add_argument("--method", default="dm", help="recipe name (default dm); see `ipmcondense methods`")
    p.add_argument("--dataset", default="digits",
                   help="dataset name (default digits), imagefolder:PATH, or a .npz/.pt file with arrays x and y")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize and centre-crop the dataset's images to NxN (needed for folders of mixed sizes)")
    p.add_argument("--ipc", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--iterations", type=int, default=None, help="outer iterations (default: recipe/budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="folder holding torchvision datasets")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in OUT")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N iterations")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="write checkpoint.pt every N iterations (default: 20 checkpoints per run, and the last)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--feature-map", choices=FEATURE_MAP_NAMES, default=None, help="replace the feature map")
    p.add_argument("--discrepancy", choices=(*DISCREPANCY_NAMES, *DISCREPANCY_ALIASES), default=None,
                   metavar="{" + ",".join(DISCREPANCY_NAMES) + "}", help="replace the discrepancy")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="replace the parameter sampler")
    p.add_argument("--augmentation", choices=AUGMENTATION_NAMES, default=None, help="replace the augmentation")
    p.add_argument("--synthetic", choices=SYNTHETIC_NAMES, default=None,
                   help="how the synthetic set is parameterised (default: the recipe's, pixels)")
    p.add_argument("--real-batches", choices=REAL_BATCH_NAMES, default=None,
                   help="how real images are drawn each step (default: the recipe's, random)")
    p.add_argument("--lr-images", type=float, default=None)
    p.add_argument("--batch-real", type=int, default=None)
    p.add_argument("--init", default=None, help="real | noise | random | herding | kcenter | kmeans")
    p.add_argument("--arch", default=None, help="network of the feature map (default convnet)")
    p.add_argument("--experts", default=None, metavar="DIR",
                   help="expert-trajectory buffer for --method mtt (make one with `ipmcondense experts`)")
    p.add_argument("--generator", default=None, metavar="DIR",
                   help="generator run directory for --synthetic latent (GLaD, IT-GAN; make one with "
                        "`ipmcondense generator`)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                   help="float32 (default, the references) or bfloat16: autocast the networks' forward passes of a "
                        "matching recipe (about 2x faster on CPUs with AMX/AVX512-BF16 and on GPUs)")
    p.add_argument("--channels-last", action="store_const", const=True, default=None,
                   help="run the no-autograd real-side passes of a matching recipe in channels_last memory format "
                        "(float32 arithmetic in another order; about 2x faster for large real batches on CPU)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter, e.g. --set inner_loop=5 --set bandwidth=2.0")
    p.set_defaults(func=run_condense)

    e = subparsers.add_parser(
        "evaluate",
        help="train networks on a condensed set and print their test accuracy as JSON",
        description="Evaluate a condensed set with the standard protocol; saves evaluation.json next to it.",
    )
    e.add_argument("path", help="run directory or synthetic.pt")
    e.add_argument("--dataset", default=None,
                   help="dataset (default: the one condensed): a name, imagefolder:PATH or a .npz/.pt file")
    e.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize and centre-crop the dataset's images to NxN (default: the synthetic images' size)")
    e.add_argument("--models", type=int, default=5, help="number of networks (default 5)")
    e.add_argument("--arch", default=None, help="evaluation network (default: the condensation arch)")
    e.add_argument("--epochs", type=int, default=None, help="training epochs (default 1000 with DSA)")
    e.add_argument("--data-root", default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default=None)
    e.add_argument("--augmentation", choices=("dsa", "none"), default=None,
                   help="training augmentation (default: the protocol's; dsa for the standard protocol)")
    e.add_argument("--protocol", choices=("standard", "published"), default="standard",
                   help="standard: the VICO-UoE protocol for every method (default); published: the protocol of "
                        "the method's paper on this dataset (e.g. DC on CIFAR: no augmentation, 300 epochs)")
    e.add_argument("--ipc", type=int, default=None,
                   help="for a generator run directory (ipmcondense generator / dim): images per class to sample")
    e.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="float32 (default, the protocol) or bfloat16: autocast the networks' forward passes (a "
                        "deviation, recorded in evaluation.json)")
    e.add_argument("--no-learned-lr", action="store_true",
                   help="ignore a learning rate learned during condensation (MTT) and use the protocol's")
    e.set_defaults(func=run_evaluate)

    m = subparsers.add_parser("methods", help="list the recipes (rows of the method table) with their axes")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=run_methods)


def run_condense(args: argparse.Namespace) -> int:
    from ipmcondense.condensation.api import condense

    overrides = dict(args.overrides)
    for key in ("lr_images", "batch_real", "init", "arch", "experts", "checkpoint_every", "generator", "precision",
                "channels_last"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    result = condense(
        args.method, args.dataset, args.ipc, out=args.out, iterations=args.iterations, seed=args.seed,
        data_root=args.data_root, resume=args.resume, overwrite=args.overwrite, device=args.device,
        progress=not args.no_progress, eval_every=args.eval_every, feature_map=args.feature_map,
        discrepancy=args.discrepancy, sampler=args.sampler, augmentation=args.augmentation,
        synthetic=args.synthetic, real_batches=args.real_batches, image_size=args.image_size, **overrides,
    )
    losses = result.metrics["loss_history"]
    summary = {
        "out": str(result.out),
        "method": result.recipe.name,
        "dataset": result.config["dataset"],
        "ipc": result.config["ipc"],
        "iterations": result.config["iterations"],
        "final_loss": losses[-1] if losses else None,
        "seconds": round(result.metrics["seconds"], 3),
        "seconds_per_iteration": round(result.metrics["seconds_per_iteration"], 4),
    }
    if is_rank_zero():
        print(json.dumps(summary))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ipmcondense.condensation.api import evaluate

    report = evaluate(
        args.path, dataset=args.dataset, models=args.models, arch=args.arch, epochs=args.epochs,
        data_root=args.data_root, seed=args.seed, device=args.device, augmentation=args.augmentation,
        learned_lr=not args.no_learned_lr, image_size=args.image_size, protocol=args.protocol,
        ipc=args.ipc, precision=args.precision,
    )
    if is_rank_zero():
        print(json.dumps(report, indent=2))
    return 0


_TABLE_COLUMNS = (
    ("method", "name"), ("kind", "kind"), ("objective", "objective"), ("feature map", "feature_map"),
    ("discrepancy", "discrepancy"), ("sampler", "sampler"), ("aug", "augmentation"), ("synthetic", "synthetic"),
    ("real batches", "real_batches"), ("relation to an IPM", "relation_to_ipm"),
)


def methods_table() -> str:
    """The recipe table as fixed-width text, one row per method (``-``: the axis does not apply to the row)."""
    from ipmcondense.condensation.recipes import RECIPES

    def cell(axes: dict, key: str) -> str:
        value = axes.get(key)
        if key == "relation_to_ipm" and axes["extra_terms"]:
            return f"{value} + {','.join(axes['extra_terms'])}"
        if key == "kind" and axes.get("selection"):
            return f"selection:{axes['selection']}"
        return "-" if value is None else str(value)

    rows = [tuple(title for title, _ in _TABLE_COLUMNS)]
    rows += [tuple(cell(r.axes(), key) for _, key in _TABLE_COLUMNS) for r in RECIPES.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_TABLE_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run_methods(args: argparse.Namespace) -> int:
    from ipmcondense.condensation.recipes import RECIPES

    if args.json:
        print(json.dumps([r.axes() for r in RECIPES.values()], indent=2, default=list))
    else:
        sys.stdout.write(methods_table() + "\n")
    return 0
