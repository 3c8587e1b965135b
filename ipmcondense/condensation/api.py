"""The Python entry points: :func:`condense` a dataset with a recipe, :func:`evaluate` the result.

.. code-block:: python

    from ipmcondense.condensation.api import condense, evaluate
    result = condense("dm", "digits", ipc=10, out="runs/digits-dm-ipc10")
    print(evaluate("runs/digits-dm-ipc10", models=3)["accuracy_mean"])

    condense("dm", "digits", discrepancy="mmd2")           # M3D by composition
    condense("dc", "digits", discrepancy="mmd2", sampler="fresh", gradient_mode="per_sample")

Everything is validated (method, axes, dataset, data root, architecture, IPC, hyperparameters,
device, checkpoint) before the output folder is created, and every file is written atomically, so a
bad call leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ipmcondense import distributed
from ipmcondense._version import __version__
from ipmcondense.ipm._validation import check_choice, check_positive_int, check_positive_number
from ipmcondense.training import PRECISIONS

from .engine import CondensationEngine
from .outputs import (
    CHECKPOINT_FILE,
    EVALUATION_FILE,
    GRID_FILE,
    METRICS_FILE,
    RUN_FILES,
    SYNTHETIC_FILE,
    SYNTHETIC_FORMAT,
    atomic_torch_save,
    atomic_write_json,
    load_checkpoint,
    load_synthetic,
    save_image_grid,
    synthetic_path,
)
from .objectives import get_objective_class
from .parallel import ClassShard, check_class_parallel
from .recipes import COMMON_DEFAULTS, MatchingRecipe, Recipe, compose_recipe, resolve_config
from .synthetic import INIT_CHOICES, SYNTHETIC_SETS, build_synthetic_set, initial_images

__all__ = ["condense", "evaluate", "CondensationResult", "load_dataset_checked"]

# hyperparameters that may change when a run is resumed (everything else must match the checkpoint)
_RESUMABLE_CHANGES = ("data_root", "iterations", "eval_every", "eval_models", "eval_epochs", "checkpoint_every", "class_batching")


@dataclass
class CondensationResult:
    """What :func:`condense` returns (and writes to ``out``).

    Attributes:
        images: ``(num_classes * k, C, H, W)`` decoded synthetic images (normalised space, or the ZCA-whitened
            space when ``config["zca"]``; CPU), class-blocked;
            ``k = ipc`` for ``pixels``, ``ipc * factor**2`` for ``multiformation`` (``synthetic.pt`` also holds the
            stored parameters under ``"stored"``).
        labels: ``(num_classes * k,)`` labels.
        config: the full configuration (method, axes, dataset, ipc, seed, hyperparameters).
        metrics: loss history, timings, evaluations.
        out: the run directory, or ``None``.
        recipe: the registry row (possibly composed).
        learning_rate: the learned training learning rate (MTT), or ``None``.
        training_labels: what the evaluation trains on (soft labels, learned labels, or ``labels``).
        learned_schedule: the learned training schedule (DD, :class:`~ipmcondense.evaluation.LearnedSchedule`)
            that the evaluation replays, or ``None``.
    """

    images: Tensor
    labels: Tensor
    config: dict[str, Any]
    metrics: dict[str, Any]
    out: Path | None
    recipe: Recipe
    learning_rate: float | None = None
    training_labels: Tensor | None = field(default=None, repr=False)
    learned_schedule: Any = field(default=None, repr=False)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use device='cpu'")
    return dev


def load_dataset_checked(
    dataset: Any, data_root: str | os.PathLike | None, image_size: int | tuple[int, int] | None = None
) -> Any:
    """A :class:`ipmcondense.data.LabelledImages` from a dataset spec (:func:`ipmcondense.data.load_dataset`:
    a built-in name, ``imagefolder:PATH`` or a ``.npz``/``.pt`` file) loaded from ``data_root``, or as given."""
    from ipmcondense.data import LabelledImages, load_dataset

    if isinstance(dataset, LabelledImages):
        return dataset
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a dataset name or a LabelledImages, got {type(dataset).__name__}")
    return load_dataset(dataset, data_root, image_size=image_size)


def _check_config(config: dict[str, Any], recipe: Recipe, dataset: Any, ipc: int) -> None:
    from ipmcondense.nets import build_isolated, get_network

    check_positive_int(config["iterations"], "iterations", allow_zero=True)
    check_positive_int(config["batch_real"], "batch_real")
    check_positive_int(config["checkpoint_every"], "checkpoint_every", allow_zero=True)
    check_positive_int(config["eval_every"] or 0, "eval_every", allow_zero=True)
    check_positive_int(config["eval_models"], "eval_models")
    for key in ("lr_images", "lr_net", "lr_pool"):
        check_positive_number(config[key], key)
    check_choice(config["init"], INIT_CHOICES, "init")
    check_choice(config["precision"], PRECISIONS, "precision")
    if not isinstance(config["channels_last"], bool):
        raise TypeError(f"channels_last must be True or False, got {config['channels_last']!r}")
    if config["precision"] != "float32" and not isinstance(recipe, MatchingRecipe):
        raise ValueError(
            f"precision {config['precision']!r} is only available for matching recipes (their networks' forward "
            f"passes are autocast); recipe {recipe.name!r} has objective {getattr(recipe, 'objective', '?')!r}: "
            "use precision 'float32'"
        )
    if not isinstance(config["arch"], str):
        raise TypeError(f"arch must be a network name, got {type(config['arch']).__name__}")
    net = build_isolated(lambda: get_network(config["arch"], dataset.channels, dataset.num_classes,
                                             dataset.image_size))
    if isinstance(recipe, MatchingRecipe) and recipe.feature_map in ("layers", "attention") and not hasattr(net, "layer_features"):
        raise ValueError(f"feature map {recipe.feature_map!r} needs an arch with layer_features, got {config['arch']!r}")
    counts = torch.bincount(dataset.train_labels.cpu(), minlength=dataset.num_classes)
    smallest = int(counts.min())
    if ipc > smallest:
        raise ValueError(
            f"ipc {ipc} is larger than the smallest class of {dataset.name!r} "
            f"(class {int(counts.argmin())} has {smallest} training images)"
        )


def _initial_per_class(recipe: Recipe, config: dict[str, Any], dataset: Any, ipc: int) -> int:
    """Initial images per class the row's parameterisation starts from (``ipc``, or more for a decoder)."""
    cls = SYNTHETIC_SETS.get(recipe.synthetic)
    n = cls.initial_images_per_class(ipc, cls.options_from(config))
    if n != ipc and config["init"] != "noise":
        smallest = int(torch.bincount(dataset.train_labels.cpu(), minlength=dataset.num_classes).min())
        if n > smallest:
            raise ValueError(
                f"synthetic {recipe.synthetic!r} starts ipc {ipc} stored images per class from {n} real images "
                f"per class (its options {cls.options_from(config)}), more than the smallest class of "
                f"{dataset.name!r} holds ({smallest}); lower ipc or the factor, or use init 'noise'"
            )
    return n


def _check_out(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Validate ``out`` before anything is written; return the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a directory")
    existing = [name for name in RUN_FILES if (out / name).exists()] if out.exists() else []
    if resume:
        if (out / CHECKPOINT_FILE).exists():
            return load_checkpoint(out / CHECKPOINT_FILE)
        raise ValueError(
            f"resume: there is no checkpoint to continue in out {str(out)!r} (no {CHECKPOINT_FILE}); run without "
            "resume=True (--resume) to start this run"
        )
    if existing and not overwrite:
        raise ValueError(
            f"out {str(out)!r} already holds a run ({', '.join(existing)}); pass resume=True (--resume) to "
            f"continue it, overwrite=True (--overwrite) to replace it, or choose another directory"
        )
    return None


def _check_resume(checkpoint: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    old = checkpoint["config"]
    different = [
        k for k in sorted(set(old) | set(config))
        if k not in _RESUMABLE_CHANGES and _normalise(old.get(k)) != _normalise(config.get(k))
    ]
    # keys added to the library after the checkpoint was written count as their defaults
    different = [
        k for k in different
        if not (k not in old and _normalise(config.get(k)) == _normalise(COMMON_DEFAULTS.get(k)))
    ]
    if different:
        details = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {config.get(k)!r}" for k in different)
        raise ValueError(f"cannot resume {str(out)!r}: the configuration differs ({details})")
    if int(checkpoint["iteration"]) > int(config["iterations"]):
        raise ValueError(
            f"cannot resume {str(out)!r}: the checkpoint is at iteration {checkpoint['iteration']}, beyond "
            f"iterations={config['iterations']}"
        )


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(v) for v in value)
    return value


def condense(
    method: str = "dm",
    dataset: Any = "digits",
    ipc: int = 10,
    *,
    out: str | os.PathLike | None = None,
    iterations: int | None = None,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    eval_every: int | None = None,
    feature_map: str | None = None,
    discrepancy: str | None = None,
    sampler: str | None = None,
    augmentation: str | None = None,
    synthetic: str | None = None,
    real_batches: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    **overrides: Any,
) -> CondensationResult:
    r"""Condense ``dataset`` to ``ipc`` images per class with the recipe ``method``.

    Minimises the recipe's objective over the synthetic set :math:`S`; for the feature-matching recipes
    :math:`L(S) = \mathbb E_\theta \sum_c D(\phi_\theta(A(T_c)), \phi_\theta(A(S_c)))` (see
    :mod:`ipmcondense.condensation.engine`), a stochastic estimate per step. Cost: ``iterations`` outer
    steps, each (for matching recipes) one feature-map forward pass per side on ``batch_real`` real and
    ``ipc`` synthetic images per class, for every sampled network, plus the sampler's network training.

    Args:
        method: a registry row (:data:`ipmcondense.condensation.recipes.METHOD_NAMES`).
        dataset: a dataset name (:data:`ipmcondense.data.DATASET_NAMES`) or a ``LabelledImages``.
        ipc: images per class (at most the smallest class size).
        out: run directory (synthetic.pt, metrics.json, synthetic.png, checkpoint.pt); ``None`` keeps
            everything in memory (no checkpoints).
        iterations: outer iterations (default: the recipe's, or the dataset budget profile's).
        seed: seeds the run's only generator (initialisation, batches, augmentation, networks).
        data_root: where torchvision datasets live (not needed for ``"digits"``).
        resume: continue from ``out/checkpoint.pt`` bit-for-bit (an error if there is none, or if the
            checkpoint's configuration differs from this call's).
        overwrite: replace an existing run in ``out``.
        device: ``"cpu"`` (default), ``"cuda"``, ...
        progress: tqdm progress bar on stderr.
        eval_every: evaluate every N iterations (``eval_models`` models, ``eval_epochs`` epochs).
        feature_map, discrepancy, sampler, augmentation: replace axes of ``method`` (free composition).
        synthetic: the parameterisation of S (:data:`~ipmcondense.condensation.synthetic.SYNTHETIC_NAMES`,
            default the row's, ``"pixels"``). ``"latent"`` (GLaD, IT-GAN) and ``"latent_gan"`` (DCGM) also need ``generator=``: a generator
            run directory (:func:`ipmcondense.generators.train_generator`) or an ``nn.Module`` with an integer
            ``latent_dim`` mapping ``(latents, labels)`` to normalised images.
        real_batches: how real images are drawn per step
            (:data:`~ipmcondense.condensation.real_batches.REAL_BATCH_NAMES`, default the row's, ``"random"``).
        image_size: resize and centre-crop the dataset's images to ``S x S`` (or ``(H, W)``) when it is
            loaded by name (see :func:`ipmcondense.data.load_dataset`).
        **overrides: hyperparameters (:data:`ipmcondense.condensation.recipes.HYPERPARAMETER_KEYS`), e.g.
            ``lr_images``, ``batch_real``, ``init``, ``arch``, ``inner_loop``, ``bandwidth``.

    Returns:
        A :class:`CondensationResult`.

    Class-parallel: called on every rank of an initialised ``torch.distributed`` process group (e.g. under
    ``torchrun --nproc_per_node W``), each rank condenses its own block of classes and the ranks exchange what
    the recipe needs (:mod:`ipmcondense.condensation.parallel`); rank 0 writes ``out`` and every rank
    returns the full result, equal to the single-process one for the same seed. ``resume`` needs the same
    number of processes as the run that wrote the checkpoint.

    Raises:
        ValueError / TypeError / FileNotFoundError: any bad input, before ``out`` is created.
    """
    start = time.perf_counter()
    generator_module = _generator_override(overrides)
    if not isinstance(method, str):
        raise TypeError(f"method must be a recipe name, got {type(method).__name__}")
    recipe = compose_recipe(method.lower().strip(), feature_map=feature_map, discrepancy=discrepancy,
                            sampler=sampler, augmentation=augmentation, synthetic=synthetic,
                            real_batches=real_batches)
    ipc = check_positive_int(ipc, "ipc")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    dev = _resolve_device(distributed.local_device(device))
    ds = load_dataset_checked(dataset, data_root, image_size)
    config = resolve_config(recipe, ds.name, {**overrides, "iterations": iterations, "eval_every": eval_every},
                            ipc=ipc)
    if recipe.is_selection:
        config["init"] = recipe.selection
        config["iterations"] = 0
    _check_config(config, recipe, ds, ipc)
    # ZCA (MTT/KIP/RFAD/RCIG): every step, the initial images and the synthetic set live in the whitened space
    whitening = _whitening(config, ds)
    raw_ds, ds = ds, (ds if whitening is None else whitening.whitened_dataset(ds))
    objective = None if recipe.is_selection else get_objective_class(recipe.objective)
    if objective is not None:
        config = objective.prepare_config(config, ds)
    shard = None
    if distributed.is_active():
        check_class_parallel(recipe, config, _build_network_factory(config, ds)(), distributed.world_size(),
                             ds.num_classes)
        shard = None if recipe.is_selection else ClassShard.of_this_rank(ds.num_classes)
        progress = progress and distributed.is_rank_zero()
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise ValueError("resume=True needs out: the run directory whose checkpoint to continue")
    checkpoint = _check_out(out_path, resume, overwrite) if out_path is not None else None
    full_config = {
        "method": recipe.name, "dataset": ds.name, "ipc": ipc, "seed": seed,
        "data_root": None if data_root is None else str(data_root), "recipe": recipe.axes(), **config,
    }
    if checkpoint is not None:
        _check_resume(checkpoint, full_config, out_path)

    init_generator = torch.Generator().manual_seed(int(seed) + 7919)
    images, labels = initial_images(ds, _initial_per_class(recipe, config, ds, ipc), config["init"], init_generator,
                                    seed=seed, arch=config["arch"])
    extras = None if objective is None else objective.synthetic_extras(images, labels, ds, config)
    if generator_module is not None and not getattr(SYNTHETIC_SETS.get(recipe.synthetic), "needs_generator", False):
        raise ValueError(f"generator is used by synthetic 'latent' and 'latent_gan' only; method {recipe.name!r} uses "
                         f"{recipe.synthetic!r}")
    synthetic_set = build_synthetic_set(recipe.synthetic, images, labels, ds.num_classes, config, extras,
                                        generator=generator_module, rng=init_generator).to(dev)

    writer = distributed.is_rank_zero()  # in a class-parallel run, rank 0 writes the files
    created = out_path is not None and not out_path.exists()
    if out_path is not None:
        distributed.barrier()  # every rank has read the checkpoint before rank 0 touches the folder
        if writer:
            if overwrite and not resume:
                for name in RUN_FILES:
                    if (out_path / name).exists():
                        (out_path / name).unlink()
            out_path.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
    try:
        history, schedule = _optimise(recipe, full_config, ds, synthetic_set, seed, dev, out_path, progress,
                                      checkpoint, raw_ds, whitening, shard)
        pixels = ds.denormalise if whitening is None else whitening.to_pixels
        return _finish(recipe, full_config, ds, synthetic_set, history, out_path if writer else None,
                       time.perf_counter() - start, dev, pixels, schedule, result_out=out_path)
    except BaseException:
        # a run that failed before its first checkpoint leaves no folder behind
        if writer and created and out_path.exists() and not any(out_path.iterdir()):
            out_path.rmdir()
        raise


def _generator_override(overrides: dict[str, Any]) -> Any:
    """Turn a ``generator=`` override into its config string; return the ``nn.Module`` if one was given.

    A path (``str`` / ``PathLike``: a generator run directory) stays in the configuration as a string; an
    ``nn.Module`` is kept out of it (the configuration is saved as JSON) and recorded as
    ``"<module ClassName>"``.
    """
    from torch import nn

    value = overrides.get("generator")
    if value is None:
        return None
    if isinstance(value, nn.Module):
        overrides["generator"] = f"<module {type(value).__name__}>"
        return value
    if isinstance(value, (str, os.PathLike)):
        overrides["generator"] = str(value)
        return None
    raise TypeError(f"generator must be a generator run directory or an nn.Module, got {type(value).__name__}")


def _build_network_factory(config: dict[str, Any], ds: Any):
    from ipmcondense.nets import get_network

    def build():
        return get_network(config["arch"], ds.channels, ds.num_classes, ds.image_size)

    return build


def _whitening(config: dict[str, Any], ds: Any):
    """The :class:`~ipmcondense.whitening.DatasetWhitening` of ``ds`` when ``config["zca"]``, else ``None``."""
    if not isinstance(config["zca"], bool):
        raise TypeError(f"zca must be True or False, got {config['zca']!r}")
    check_positive_number(config["zca_eps"], "zca_eps")
    if not config["zca"]:
        return None
    from ipmcondense.whitening import DatasetWhitening

    return DatasetWhitening(ds, float(config["zca_eps"]))


def _evaluation_fn(config: dict[str, Any], ds: Any, seed: int, dev: torch.device, synthetic: Any = None,
                   whitening: Any = None, learned_schedule: Any = None, spread_over_ranks: bool = False):
    """In-run evaluation on the raw dataset ``ds``: with ``zca`` the protocol is told the images are whitened;
    ``learned_schedule()`` gives the objective's current schedule (DD) or ``None``; ``spread_over_ranks``
    spreads the models over the ranks of a class-parallel run."""
    from ipmcondense.evaluation import EvaluationProtocol, evaluate_synthetic

    def run(images: Tensor, labels: Tensor) -> dict[str, Any]:
        learned_lr = None if synthetic is None else synthetic.learned_learning_rate()
        protocol = EvaluationProtocol(arch=config["arch"], epochs=config["eval_epochs"], learned_lr=learned_lr,
                                      learned_schedule=None if learned_schedule is None else learned_schedule(),
                                      soft_labels=labels.dim() == 2, zca=bool(config["zca"]),
                                      zca_eps=float(config["zca_eps"]))
        result = evaluate_synthetic(images, labels, ds, protocol, n_models=int(config["eval_models"]),
                                    seed=seed, device=dev, inputs_whitened=bool(config["zca"]), whitening=whitening,
                                    spread_over_ranks=spread_over_ranks)
        return {"accuracy_mean": result.accuracy_mean, "accuracy_std": result.accuracy_std,
                "accuracies": list(result.accuracies)}

    return run


def _optimise(recipe, config, ds, synthetic, seed, dev, out_path, progress, checkpoint, raw_ds, whitening,
              shard=None):
    if recipe.is_selection:
        return None, None
    engine = CondensationEngine(
        recipe, config, ds, synthetic, _build_network_factory(config, ds), seed=seed, device=dev,
        out=out_path, progress=progress,
        evaluate=_evaluation_fn(config, raw_ds, seed, dev, synthetic, whitening,
                                lambda: engine.objective.learned_schedule(), spread_over_ranks=shard is not None),
        shard=shard,
    )
    if checkpoint is not None:
        try:
            engine.load_state_dict(checkpoint)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(
                f"checkpoint {out_path / CHECKPOINT_FILE} does not match this run ({err}); delete it to start over"
            ) from err
    return engine.run(), engine.objective.learned_schedule()


def _finish(
    recipe, config, ds, synthetic, history, out_path, seconds, dev, pixels, schedule=None, result_out=None
) -> CondensationResult:
    images = synthetic.images().detach().cpu().clone()
    labels = synthetic.labels.detach().cpu().clone()
    training_labels = synthetic.training_labels().detach().cpu().clone()
    lr = synthetic.learned_learning_rate()
    losses = [] if history is None else list(history.losses)
    step_seconds = [] if history is None else list(history.iteration_seconds)
    metrics = {
        "method": recipe.name,
        "dataset": ds.name,
        "ipc": config["ipc"],
        "iterations": config["iterations"],
        "loss_history": losses,
        "seconds": float(sum(step_seconds)) if step_seconds else float(seconds),
        "seconds_per_iteration": float(sum(step_seconds) / len(step_seconds)) if step_seconds else 0.0,
        "wall_seconds_this_call": float(seconds),
        "iteration_seconds": step_seconds,
        "evaluations": [] if history is None else list(history.evaluations),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "version": __version__,
    }
    if distributed.is_active():
        metrics["processes"] = distributed.world_size()
    if out_path is not None:
        atomic_torch_save(
            {
                "format": SYNTHETIC_FORMAT, "images": images, "labels": labels, "training_labels": training_labels,
                "learning_rate": lr, "learned_schedule": None if schedule is None else schedule.to_dict(),
                "config": config, "recipe": recipe.axes(), "dataset": ds.name,
                "ipc": config["ipc"], "version": __version__, "synthetic": recipe.synthetic,
                "stored": {k: v.detach().cpu().clone() for k, v in synthetic.state_dict().items()},
            },
            out_path / SYNTHETIC_FILE,
        )
        atomic_write_json({**metrics, "config": config}, out_path / METRICS_FILE)
        save_image_grid(images, synthetic.images_per_class, out_path / GRID_FILE, pixels)
    distributed.barrier()  # class-parallel: every rank returns once rank 0 has written the run
    return CondensationResult(images, labels, config, metrics, result_out if result_out is not None else out_path,
                              recipe, lr, training_labels, schedule)


def _generator_run_dir(path: Any) -> Path | None:
    """``path`` as a generator run directory (holds ``generator.pt`` and no ``synthetic.pt``), else ``None``."""
    from ipmcondense.generators import GENERATOR_FILE

    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir() and (p / GENERATOR_FILE).exists() and not (p / SYNTHETIC_FILE).exists():
            return p
    return None


def _sample_generator(run: Path, ipc: Any, seed: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``ipc`` class-blocked samples per class of the generator in ``run`` and the config they evaluate with."""
    from ipmcondense.data.files import torch_load_weights_only
    from ipmcondense.generators import GENERATOR_FILE, load_generator

    if ipc is None:
        raise ValueError(f"{str(run)!r} is a generator run directory: pass ipc (--ipc), the images per class to sample")
    ipc = check_positive_int(ipc, "ipc")
    generator = load_generator(run)
    meta = torch_load_weights_only(run / GENERATOR_FILE, "generator")
    labels = torch.arange(generator.num_classes).repeat_interleave(ipc)
    z = torch.randn(labels.shape[0], generator.latent_dim, generator=torch.Generator().manual_seed(int(seed)))
    with torch.no_grad():
        images = generator(z, labels)
    from .recipes import DATASET_DEFAULTS

    dataset = meta.get("dataset")
    config = {"dataset": dataset, "method": f"generator:{run.name}", "ipc": ipc,
              "arch": DATASET_DEFAULTS.get(dataset, {}).get("arch", "convnet")}
    return images, labels, config


def evaluate(
    path_or_result: str | os.PathLike | CondensationResult,
    dataset: Any = None,
    models: int = 5,
    arch: str | None = None,
    *,
    epochs: int | None = None,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    augmentation: str | None = None,
    save: bool = True,
    learned_lr: bool = True,
    image_size: int | tuple[int, int] | None = None,
    protocol: str = "standard",
    ipc: int | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """Train ``models`` fresh networks on a condensed set and report their test accuracy.

    ``path_or_result`` may also be a *generator run directory* (``ipmcondense generator``, or DiM's
    :func:`ipmcondense.generators.distill_into_generator`): then ``ipc`` images per class are sampled from it,
    :math:`x = G(z, y)` with :math:`z \\sim N(0, I)` drawn from a generator seeded with ``seed``, and evaluated
    as a condensed set (any ``ipc``: the sample count is free).

    The estimate is the mean (and population std) of the test accuracies of the ``models`` networks,
    each trained from scratch on the synthetic set alone with the protocol of
    :class:`ipmcondense.evaluation.EvaluationProtocol`. Cost: ``models x epochs`` passes over the
    synthetic set plus one pass over the test set per model.

    Uses :func:`ipmcondense.evaluation.evaluate_synthetic` with the standard protocol (ConvNet, SGD
    0.01 momentum 0.9, ``epochs`` (default 1000 with DSA), full test set once at the end).

    Args:
        path_or_result: a run directory, a ``synthetic.pt`` file, or a :class:`CondensationResult`.
        dataset: dataset name or ``LabelledImages`` (default: the one the set was condensed from).
        models: number of networks (seeds ``seed .. seed + models - 1``).
        arch: evaluation network (default: the condensation arch).
        epochs: training epochs (default: the protocol's).
        data_root: where torchvision datasets live (default: the one recorded at condensation).
        device: training device (default CPU).
        augmentation: ``"dsa"`` or ``"none"`` (default: the protocol's; ``"dsa"`` for ``"standard"``).
        save: write ``evaluation.json`` next to the synthetic set.
        learned_lr: train with what was learned during condensation when the set has it: MTT's learning
            rate (the protocol's ``learned_lr`` option) or DD's schedule, replayed instead of the epoch loop
            (the protocol's ``learned_schedule``); ``False`` uses the standard protocol.
        image_size: resize the dataset's images (see :func:`ipmcondense.data.load_dataset`); default:
            the synthetic images' size when the recorded dataset is reloaded, none for a given ``dataset``.
        protocol: ``"standard"`` (the VICO-UoE protocol for every method) or ``"published"`` (the protocol of
            the method's paper on this dataset, :mod:`ipmcondense.condensation.published`, e.g. DC on CIFAR
            without augmentation for 300 epochs); ``arch``, ``epochs`` and ``augmentation`` given explicitly
            override it. ZCA, the learned rate and soft labels come from the set under both.
        ipc: images per class to sample when ``path_or_result`` is a generator run directory (required there,
            refused otherwise).
        precision: ``"float32"`` (the protocol) or ``"bfloat16"``: the networks' forward passes under bfloat16
            autocast, a deviation recorded in the report's protocol (:class:`~ipmcondense.evaluation.EvaluationProtocol`).

    Under ``torchrun`` (an initialised process group) the models are spread over the ranks
    (:func:`ipmcondense.evaluation.evaluate_synthetic` with ``spread_over_ranks``): every rank returns the
    serial run's numbers and rank 0 writes ``evaluation.json``.

    Returns:
        ``{"accuracy_mean", "accuracy_std", "n_models", "accuracies", "seeds", "protocol", "protocol_name",
        ...}`` (accuracies in ``[0, 1]``; ``protocol_name`` is ``protocol``, ``"protocol"`` the settings used).
    """
    from ipmcondense.evaluation import EvaluationProtocol, LearnedSchedule, evaluate_synthetic

    from .published import PROTOCOL_NAMES, protocol_settings

    models = check_positive_int(models, "models")
    check_choice(protocol, PROTOCOL_NAMES, "protocol")
    generator_run = _generator_run_dir(path_or_result)
    if generator_run is None and ipc is not None:
        raise ValueError("ipc applies to a generator run directory (a condensed set has its own ipc); leave it out")
    if generator_run is not None:
        images, labels, config = _sample_generator(generator_run, ipc, seed)
        lr, schedule, folder = None, None, generator_run
    elif isinstance(path_or_result, CondensationResult):
        images, labels, config = path_or_result.images, path_or_result.training_labels, path_or_result.config
        lr, folder = path_or_result.learning_rate, path_or_result.out
        schedule = path_or_result.learned_schedule
        if labels is None:
            labels = path_or_result.labels
    else:
        data = load_synthetic(path_or_result)
        images, labels, config = data["images"], data.get("training_labels", data["labels"]), data["config"]
        lr = data.get("learning_rate")
        schedule = data.get("learned_schedule")
        schedule = None if schedule is None else LearnedSchedule.from_dict(schedule)
        folder = synthetic_path(path_or_result).parent
    if dataset is None:
        dataset = config["dataset"]
        if data_root is None:
            data_root = config.get("data_root")
        if image_size is None:
            image_size = tuple(int(v) for v in images.shape[-2:])
    ds = load_dataset_checked(dataset, data_root, image_size)
    if tuple(images.shape[1:]) != (ds.channels, *ds.image_size):
        raise ValueError(
            f"the synthetic images have shape {tuple(images.shape[1:])} but dataset {ds.name!r} has "
            f"{(ds.channels, *ds.image_size)}"
        )
    dev = _resolve_device(distributed.local_device(device))
    if not learned_lr:
        lr = schedule = None
    # a set condensed in the ZCA space (config "zca") is evaluated there: the test set is whitened with the
    # same transform (fitted again on the full training set) and the synthetic images are left as they are
    whitened = bool(config.get("zca", False))
    settings = protocol_settings(str(config.get("method")), ds.name, protocol)
    settings.setdefault("arch", config.get("arch", "convnet"))
    settings.setdefault("augmentation", "dsa")
    explicit = {"arch": arch, "epochs": epochs, "augmentation": augmentation}
    settings.update({k: v for k, v in explicit.items() if v is not None})
    settings.update(learned_lr=lr, learned_schedule=schedule, soft_labels=labels.dim() == 2, zca=whitened,
                    zca_eps=float(config.get("zca_eps", 0.1)), precision=precision)
    evaluation_protocol = EvaluationProtocol(**settings)
    result = evaluate_synthetic(images.to(dev), labels.to(dev), ds, evaluation_protocol, n_models=models, seed=seed,
                                device=dev, inputs_whitened=whitened, spread_over_ranks=distributed.is_active())
    report = {
        "accuracy_mean": result.accuracy_mean,
        "accuracy_std": result.accuracy_std,
        "n_models": result.n_models,
        "accuracies": list(result.accuracies),
        "seeds": list(result.seeds),
        "protocol": result.protocol,
        "protocol_name": protocol,
        "dataset": ds.name,
        "method": config.get("method"),
        "ipc": config.get("ipc"),
        "train_size": result.train_size,
        "wall_seconds": list(result.wall_seconds),
    }
    if save and folder is not None and Path(folder).is_dir():
        distributed.atomic_write_on_rank_zero(atomic_write_json, report, Path(folder) / EVALUATION_FILE)
    return report
