r"""Training, saving and loading generator runs: ``ipmcondense generator`` and its Python mirror.

A generator run directory ``out`` holds

* ``generator.pt``: ``{"format", "kind", "architecture", "state_dict", "dataset", "num_classes",
  "latent_dim", "image_shape", "version"}`` (tensors and plain containers only: loaded with
  ``torch.load(weights_only=True)``);
* ``checkpoint.pt``: generator, discriminator, both Adam states, the run's random generator, the epoch and
  the history: ``resume=True`` continues bit-for-bit on the CPU;
* ``samples.png``: a grid of samples, one row per class (denormalised to [0, 1]);
* ``metrics.json``: losses per epoch, seconds, and the sample-quality score of
  :func:`ipmcondense.generators.quality.random_convnet_mmd2` (generated vs test images, next to the
  train-vs-test value of the same score as the floor a perfect generator would reach).

Every file is written atomically (:mod:`ipmcondense.files`).

Training (``kind="diffusion"``): a small class-conditional DDPM
(:mod:`ipmcondense.generators.diffusion`, trained by :mod:`ipmcondense.generators.diffusion_training`); the
checkpoint then holds the model, its EMA and one Adam state instead of the two networks.

Training (``kind="gan"``): per mini-batch of ``batch_size`` real images, one discriminator step on the hinge
loss (real batch vs ``G(z, y)`` with the real batch's labels and fresh ``z ~ N(0, I)``), then one generator
step on :math:`-E[D(G(z, y), y)]`; Adam(``lr``, betas (0.5, 0.999)) for both. Every random draw (shuffles,
latents, initialisations) comes from one ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense._version import __version__
from ipmcondense.files import atomic_torch_save, atomic_write, atomic_write_json
from ipmcondense.ipm._validation import check_choice, check_positive_int, check_positive_number
from ipmcondense.nets import build_isolated, draw_seed

from .diffusion import NOISE_SCHEDULES, DiffusionGenerator
from .gan import ConditionalDiscriminator, ConditionalGenerator, hinge_losses
from .quality import QUALITY_EMBEDDING, random_convnet_mmd2

__all__ = [
    "GENERATOR_KINDS",
    "GENERATOR_FILE",
    "GENERATOR_FORMAT",
    "GeneratorRun",
    "train_generator",
    "load_generator",
    "check_generator",
    "save_sample_grid",
]

GENERATOR_KINDS = ("gan", "diffusion")
GENERATOR_FILE = "generator.pt"
GENERATOR_CHECKPOINT_FILE = "checkpoint.pt"
SAMPLES_FILE = "samples.png"
GENERATOR_METRICS_FILE = "metrics.json"
GENERATOR_RUN_FILES = (GENERATOR_FILE, GENERATOR_CHECKPOINT_FILE, SAMPLES_FILE, GENERATOR_METRICS_FILE)
GENERATOR_FORMAT = "ipmcondense-generator-v1"
_CHECKPOINT_FORMAT = "ipmcondense-generator-checkpoint-v1"
# settings a resumed run may change
_RESUMABLE = ("epochs",)

#: Default epochs per dataset (2-core CPU budgets measured in docs/guides/generative.md).
DEFAULT_EPOCHS = {"digits": 50, "mnist": 5, "fashion-mnist": 5}
#: Default epochs of ``kind="diffusion"`` per dataset (budgets in docs/guides/generative.md).
DIFFUSION_DEFAULT_EPOCHS = {"digits": 100, "mnist": 2, "fashion-mnist": 2}
#: Default Adam step per kind.
DEFAULT_LR = {"gan": 2e-4, "diffusion": 1e-3}


@dataclass
class GeneratorRun:
    """What :func:`train_generator` returns: the trained generator (eval mode) and the run's metrics."""

    generator: ConditionalGenerator | DiffusionGenerator
    metrics: dict[str, Any]
    out: Path | None


def check_generator(generator: Any, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """Check a user's generator: an ``nn.Module`` with an integer ``latent_dim`` mapping ``(z (B, latent_dim),
    labels (B,))`` to images ``(B, *image_shape)`` in the dataset's normalised space; returns it.

    Raises ``TypeError``/``ValueError`` naming ``generator`` and what was expected.
    """
    if not isinstance(generator, nn.Module):
        raise TypeError(f"generator must be an nn.Module mapping (latents, labels) to images, got {type(generator).__name__}")
    latent_dim = getattr(generator, "latent_dim", None)
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(
            f"generator must have an integer attribute latent_dim (the size of its latent vectors), got {latent_dim!r}; "
            "set generator.latent_dim = d"
        )
    param = next(iter(generator.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        was_training = generator.training
        generator.eval()
        out = generator(torch.zeros(2, latent_dim, device=device), torch.zeros(2, dtype=torch.long, device=device) + (num_classes - 1))
        generator.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, *image_shape):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"generator must map 2 latents and labels to images (2, {', '.join(map(str, image_shape))}), got {shape}")
    return generator


def save_sample_grid(images: Tensor, per_row: int, path: str | os.PathLike, denormalise=None) -> None:
    """A PNG grid of ``images`` (``per_row`` per row), denormalised and clamped to [0, 1], written atomically."""
    from torchvision.utils import save_image

    pixels = images.detach().cpu().float()
    if denormalise is not None:
        pixels = denormalise(pixels)
    pixels = pixels.clamp(0.0, 1.0)
    atomic_write(path, lambda handle: save_image(pixels, handle, nrow=max(1, int(per_row)), padding=1, format="png"))


def load_generator(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """The generator of a run directory (or its ``generator.pt``), in ``eval()`` mode with ``requires_grad=False``:
    a :class:`ConditionalGenerator` (``kind="gan"``) or a :class:`DiffusionGenerator` (``kind="diffusion"``)."""
    from ipmcondense.data.files import torch_load_weights_only

    file = Path(path)
    if file.is_dir():
        file = file / GENERATOR_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"no generator at {file}: train one with `ipmcondense generator --kind gan --dataset D --out {file.parent}`"
        )
    data = torch_load_weights_only(file, "generator")
    if not isinstance(data, dict) or data.get("format") != GENERATOR_FORMAT or data.get("kind") not in GENERATOR_KINDS:
        raise ValueError(f"{file} is not an ipmcondense generator (format {GENERATOR_FORMAT!r} expected)")
    try:
        cls = DiffusionGenerator if data["kind"] == "diffusion" else ConditionalGenerator
        generator = cls(**data["architecture"])
        generator.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"generator file {file} is damaged ({err})") from err
    generator = generator.to(device or "cpu").eval()
    generator.requires_grad_(False)
    return generator


def _settings(dataset: Any, kind: str, latent_dim: int, width: int, batch_size: int, lr: float, seed: int) -> dict:
    return {"kind": kind, "dataset": dataset.name, "latent_dim": latent_dim, "width": width, "batch_size": batch_size,
            "lr": lr, "seed": seed, "num_classes": int(dataset.num_classes),
            "image_shape": [dataset.channels, *dataset.image_size]}


def _diffusion_settings(timesteps: Any, schedule: Any, sample_steps: Any, guidance: Any, class_dropout: Any,
                        ema_decay: Any) -> dict:
    timesteps = check_positive_int(timesteps, "timesteps")
    sample_steps = check_positive_int(sample_steps, "sample_steps")
    if sample_steps > timesteps:
        raise ValueError(f"sample_steps ({sample_steps}) cannot exceed timesteps ({timesteps})")
    for value, name in ((class_dropout, "class_dropout"), (ema_decay, "ema_decay")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return {"timesteps": timesteps, "schedule": check_choice(schedule, NOISE_SCHEDULES, "schedule"),
            "sample_steps": sample_steps, "guidance": check_positive_number(guidance, "guidance", allow_zero=True),
            "class_dropout": float(class_dropout), "ema_decay": float(ema_decay)}


def train_generator(
    dataset: Any,
    out: str | os.PathLike | None = None,
    *,
    kind: str = "gan",
    epochs: int | None = None,
    latent_dim: int = 64,
    width: int = 32,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    samples_per_class: int = 10,
    timesteps: int = 1000,
    schedule: str = "linear",
    sample_steps: int = 25,
    guidance: float = 1.0,
    class_dropout: float = 0.1,
    ema_decay: float = 0.995,
) -> GeneratorRun:
    """Train a class-conditional generator on ``dataset`` (a ``LabelledImages``) and write the run to ``out``.

    See the module docstring for the algorithm and the files. ``epochs`` defaults to
    :data:`DEFAULT_EPOCHS` of the dataset (50 otherwise). ``resume=True`` continues ``out/checkpoint.pt``
    (an error if there is none or if its settings differ, except ``epochs``); an ``out`` that already holds
    a run needs ``resume`` or ``overwrite``. Cost: ``epochs * N / batch_size`` steps, each one forward and
    backward pass of the discriminator on ``2 * batch_size`` images and of both networks on ``batch_size``.

    ``kind="diffusion"`` trains a :class:`DiffusionGenerator` instead (``latent_dim`` is then ``C*H*W``, the
    noise :math:`x_T`): ``timesteps`` :math:`T` (1000), ``schedule`` (``"linear"``), ``sample_steps`` (25 DDIM
    steps per sample), ``guidance`` (1.0: no classifier-free guidance), ``class_dropout`` (0.1) and
    ``ema_decay`` (0.995) apply to it only; ``lr`` defaults to :data:`DEFAULT_LR` of the kind and ``epochs``
    to :data:`DIFFUSION_DEFAULT_EPOCHS` (100 otherwise). Cost: one U-Net forward/backward pass on
    ``batch_size`` images per step, plus ``sample_steps`` passes per generated image at the end.
    """
    kind = check_choice(kind, GENERATOR_KINDS, "kind")
    table = DIFFUSION_DEFAULT_EPOCHS if kind == "diffusion" else DEFAULT_EPOCHS
    epochs = table.get(dataset.name, 100 if kind == "diffusion" else 50) if epochs is None else epochs
    lr = DEFAULT_LR[kind] if lr is None else lr
    epochs = check_positive_int(epochs, "epochs")
    latent_dim = check_positive_int(latent_dim, "latent_dim")
    width = check_positive_int(width, "width")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive_number(lr, "lr")
    samples_per_class = check_positive_int(samples_per_class, "samples_per_class")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    dev = torch.device(device or "cpu")
    if kind == "diffusion":
        latent_dim = dataset.channels * dataset.image_size[0] * dataset.image_size[1]
    settings = _settings(dataset, kind, latent_dim, width, batch_size, lr, seed)
    if kind == "diffusion":
        settings.update(_diffusion_settings(timesteps, schedule, sample_steps, guidance, class_dropout, ema_decay))
    if resume and out is None:
        raise ValueError("resume=True needs out: the run directory whose checkpoint to continue")
    out_path = Path(out) if out is not None else None
    checkpoint = _check_out(out_path, resume, overwrite, settings) if out_path is not None else None
    if kind == "diffusion":
        from .diffusion_training import run_diffusion

        return run_diffusion(dataset, settings, out_path, checkpoint, epochs=epochs, seed=seed, dev=dev,
                             progress=progress, samples_per_class=samples_per_class)

    rng = torch.Generator().manual_seed(int(seed))
    channels, size = dataset.channels, dataset.image_size
    generator = build_isolated(lambda: ConditionalGenerator(latent_dim, dataset.num_classes, channels, size, width,
                                                            dataset.mean, dataset.std), draw_seed(rng)).to(dev)
    critic = build_isolated(lambda: ConditionalDiscriminator(dataset.num_classes, channels, size, width),
                            draw_seed(rng)).to(dev)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.999))
    history: dict[str, list[float]] = {"loss_d": [], "loss_g": [], "epoch_seconds": []}
    epoch = 0
    if checkpoint is not None:
        generator.load_state_dict(checkpoint["generator"])
        critic.load_state_dict(checkpoint["discriminator"])
        opt_g.load_state_dict(checkpoint["optimizer_g"])
        opt_d.load_state_dict(checkpoint["optimizer_d"])
        rng.set_state(checkpoint["rng"])
        history = {k: list(v) for k, v in checkpoint["history"].items()}
        epoch = int(checkpoint["epoch"])
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    images = dataset.train_images.to(dev)
    labels = dataset.train_labels.to(dev)
    n = images.shape[0]
    steps = max(1, n // batch_size)
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs, initial=epoch, disable=not progress, desc=f"generator {kind} {dataset.name}", unit="epoch",
               dynamic_ncols=True)
    try:
        while epoch < epochs:
            start = time.perf_counter()
            generator.train()
            critic.train()
            order = torch.randperm(n, generator=rng)
            sum_d = sum_g = 0.0
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size].to(dev)
                real, y = images[idx], labels[idx]
                z = torch.randn(real.shape[0], latent_dim, generator=rng).to(dev)
                with torch.no_grad():
                    fake = generator(z, y)
                loss_d = hinge_losses(critic(real, y), critic(fake, y))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                z = torch.randn(real.shape[0], latent_dim, generator=rng).to(dev)
                loss_g = -critic(generator(z, y), y).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                if not (math.isfinite(loss_d.item()) and math.isfinite(loss_g.item())):
                    raise FloatingPointError(f"the GAN losses became non-finite at epoch {epoch}; lower lr (now {lr})")
                sum_d += loss_d.item()
                sum_g += loss_g.item()
            epoch += 1
            history["loss_d"].append(sum_d / steps)
            history["loss_g"].append(sum_g / steps)
            history["epoch_seconds"].append(time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss_d=f"{sum_d / steps:.3f}", loss_g=f"{sum_g / steps:.3f}")
            if out_path is not None:
                _save_checkpoint(out_path, epoch, settings, generator, critic, opt_g, opt_d, rng, history)
    finally:
        bar.close()

    generator.eval()
    generator.requires_grad_(False)
    metrics = _finish(generator, dataset, history, settings, epochs, out_path, samples_per_class, dev)
    return GeneratorRun(generator, metrics, out_path)


def _save_checkpoint(out_path: Path, epoch: int, settings: dict, generator, critic, opt_g, opt_d, rng, history) -> None:
    """The resumable state of a GAN run (both networks, both optimisers, the generator of the draws, the
    history) written atomically to ``out_path / GENERATOR_CHECKPOINT_FILE`` (GAN training and DiM share it)."""
    atomic_torch_save({
        "format": _CHECKPOINT_FORMAT, "version": __version__, "epoch": epoch, "settings": settings,
        "generator": generator.state_dict(), "discriminator": critic.state_dict(),
        "optimizer_g": opt_g.state_dict(), "optimizer_d": opt_d.state_dict(), "rng": rng.get_state(),
        "history": history,
    }, out_path / GENERATOR_CHECKPOINT_FILE)


def _read_checkpoint(file: Path, advice: str = "") -> dict[str, Any]:
    """The training checkpoint in ``file``; ``ValueError`` (ending in ``advice``) when it is not one."""
    from ipmcondense.data.files import torch_load_weights_only

    data = torch_load_weights_only(file, "generator checkpoint")
    if not isinstance(data, dict) or data.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{file} is not an ipmcondense generator checkpoint{advice}")
    return data


def load_stage_one(run: Path, kind: str, purpose: str) -> dict[str, Any]:
    """The training checkpoint of generator run ``run``, which a fine-tuning method (DiM, minimax diffusion)
    starts from; ``ValueError`` naming ``purpose`` when it is missing, not a generator checkpoint, or of
    another ``kind`` than the one the method fine-tunes."""
    how = f"(train one with `ipmcondense generator --kind {kind}`)"
    file = run / GENERATOR_CHECKPOINT_FILE
    if not file.exists():
        raise ValueError(f"{purpose}: generator run {str(run)!r} has no {GENERATOR_CHECKPOINT_FILE} {how}")
    data = _read_checkpoint(file)
    if data["settings"].get("kind") != kind:
        raise ValueError(f"{purpose}: generator run {str(run)!r} is of kind {data['settings'].get('kind')!r} {how}")
    return data


def _finish(generator, dataset, history, settings, epochs, out_path, samples_per_class, dev) -> dict[str, Any]:
    sample_rng = torch.Generator().manual_seed(int(settings["seed"]) + 1)
    test_labels = dataset.test_labels.to(dev)
    with torch.no_grad():
        z = torch.randn(test_labels.shape[0], generator.latent_dim, generator=sample_rng).to(dev)
        generated = torch.cat([generator(z[i:i + 500], test_labels[i:i + 500]) for i in range(0, z.shape[0], 500)])
        grid_labels = torch.arange(dataset.num_classes, device=dev).repeat_interleave(samples_per_class)
        grid = generator(torch.randn(grid_labels.shape[0], generator.latent_dim, generator=sample_rng).to(dev), grid_labels)
    test = dataset.test_images.to(dev)
    score = random_convnet_mmd2(generated, test, dataset.num_classes)
    train = dataset.train_images.to(dev)
    floor = random_convnet_mmd2(train[torch.randperm(train.shape[0], generator=sample_rng)[:test.shape[0]].to(dev)],
                                test, dataset.num_classes)
    metrics = {
        **settings, "epochs": epochs, "history": history, "seconds": float(sum(history["epoch_seconds"])),
        "quality": {"generated_vs_test_mmd2": score, "train_vs_test_mmd2": floor, "embedding": QUALITY_EMBEDDING,
                    "n_generated": int(generated.shape[0]), "n_test": int(test.shape[0])},
        "device": str(dev), "threads": torch.get_num_threads(), "version": __version__,
    }
    if out_path is not None:
        atomic_torch_save({
            "format": GENERATOR_FORMAT, "kind": settings["kind"], "architecture": generator.architecture(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
            "dataset": dataset.name, "num_classes": int(dataset.num_classes), "latent_dim": generator.latent_dim,
            "image_shape": settings["image_shape"], "version": __version__,
        }, out_path / GENERATOR_FILE)
        save_sample_grid(grid, samples_per_class, out_path / SAMPLES_FILE, dataset.denormalise)
        atomic_write_json(metrics, out_path / GENERATOR_METRICS_FILE)
    return metrics


def _check_out(out: Path, resume: bool, overwrite: bool, settings: dict) -> dict[str, Any] | None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a directory")
    if resume:
        file = out / GENERATOR_CHECKPOINT_FILE
        if not file.exists():
            raise ValueError(f"resume: there is no generator checkpoint in out {str(out)!r} (no {GENERATOR_CHECKPOINT_FILE})")
        data = _read_checkpoint(file, "; delete it to start over")
        old = data["settings"]
        different = [k for k in sorted(set(old) | set(settings)) if k not in _RESUMABLE and old.get(k) != settings.get(k)]
        if different:
            details = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {settings.get(k)!r}" for k in different)
            raise ValueError(f"cannot resume {str(out)!r}: the settings differ ({details})")
        return data
    existing = [name for name in GENERATOR_RUN_FILES if (out / name).exists()] if out.exists() else []
    if existing:
        if not overwrite:
            raise ValueError(
                f"out {str(out)!r} already holds a generator run ({', '.join(existing)}); pass resume=True (--resume) "
                "to continue it, overwrite=True (--overwrite) to replace it, or choose another directory"
            )
        for name in existing:
            (out / name).unlink()
    return None
