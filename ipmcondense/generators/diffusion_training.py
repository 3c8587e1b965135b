r"""Training loop of the diffusion generator (``train_generator(kind="diffusion")``) and its run checkpoint.

Per mini-batch of ``batch_size`` real images :math:`(x, y)` (a fresh permutation each epoch): map to the model's
[-1, 1] scale, draw :math:`t \sim U\{0..T-1\}`, :math:`\varepsilon \sim N(0, I)` and a class-dropout mask
(label replaced by the null class with probability ``class_dropout``), take one Adam step on
:func:`ipmcondense.generators.diffusion.epsilon_loss` (plus the extra terms of minimax fine-tuning, if any) and
update the exponential moving average (EMA) of the weights with decay ``ema_decay``; the saved generator is
the EMA model. Every random draw comes from one ``torch.Generator`` seeded with ``seed``; the checkpoint holds
the model, the EMA, the optimiser, that generator's state, the history and (minimax) the memory banks, so
``resume=True`` continues bit-for-bit on the CPU.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ipmcondense._version import __version__
from ipmcondense.files import atomic_torch_save

from .diffusion import DiffusionGenerator, epsilon_loss

__all__ = ["train_diffusion_epochs", "save_diffusion_checkpoint"]

@torch.no_grad()
def _update_ema(ema: DiffusionGenerator, model: DiffusionGenerator, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:  # frozen weights stay bit-identical (no rounding of d * e + (1 - d) * e)
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def save_diffusion_checkpoint(out_path: Path, epoch: int, settings: dict, model, ema, optimizer, rng, history,
                              extra: dict | None = None) -> None:
    """The resumable state of a diffusion run, written atomically to ``out_path / checkpoint.pt``."""
    from .runs import _CHECKPOINT_FORMAT, GENERATOR_CHECKPOINT_FILE

    atomic_torch_save({
        "format": _CHECKPOINT_FORMAT, "version": __version__, "epoch": epoch, "settings": settings,
        "generator": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
        "rng": rng.get_state(), "history": history, **(extra or {}),
    }, out_path / GENERATOR_CHECKPOINT_FILE)


def train_diffusion_epochs(model: DiffusionGenerator, ema: DiffusionGenerator, optimizer, images: Tensor,
                           labels: Tensor, *, epoch: int, epochs: int, batch_size: int, rng: torch.Generator,
                           class_dropout: float, ema_decay: float, history: dict[str, list[float]],
                           on_epoch_end: Callable[[int], None], extra_terms: Callable[..., dict[str, Tensor]] | None = None,
                           progress: bool = True, desc: str = "diffusion") -> int:
    """Run epochs ``epoch + 1 .. epochs`` of the loop of the module docstring; returns the final epoch.

    ``extra_terms(x0, predicted_x0, labels)`` (optional) returns a dict of named scalar tensors added to the loss
    of each step (minimax diffusion's terms).
    """
    from tqdm.auto import tqdm

    dev = images.device
    n = images.shape[0]
    steps = max(1, n // batch_size)
    timesteps = model.schedule.timesteps
    bar = tqdm(total=epochs, initial=epoch, disable=not progress, desc=desc, unit="epoch", dynamic_ncols=True)
    try:
        while epoch < epochs:
            start = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=rng)
            sums: dict[str, float] = {}
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size].to(dev)
                x0, y = model.to_model_space(images[idx]), labels[idx]
                b = x0.shape[0]
                t = torch.randint(timesteps, (b,), generator=rng).to(dev)
                noise = torch.randn(x0.shape, generator=rng).to(dev)
                dropped = (torch.rand(b, generator=rng) < class_dropout).to(dev)
                conditioning = torch.where(dropped, torch.full_like(y, model.num_classes), y)
                per_sample, x0_hat = epsilon_loss(model, x0, conditioning, t, noise)
                terms = {"loss_diffusion": per_sample.mean()}
                if extra_terms is not None:
                    terms.update(extra_terms(x0.detach(), x0_hat, y))
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _update_ema(ema, model, ema_decay)
                for key, value in terms.items():
                    v = float(value.detach())
                    if not math.isfinite(v):
                        raise FloatingPointError(f"the diffusion loss {key} became non-finite at epoch {epoch}; lower lr")
                    sums[key] = sums.get(key, 0.0) + v
            epoch += 1
            for key, total in sums.items():
                history.setdefault(key, []).append(total / steps)
            history.setdefault("epoch_seconds", []).append(time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss_diffusion'] / steps:.4f}")
            on_epoch_end(epoch)
    finally:
        bar.close()
    return epoch


def new_ema(model: DiffusionGenerator) -> DiffusionGenerator:
    """A frozen copy of ``model`` (the EMA's start)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


def run_diffusion(dataset: Any, settings: dict, out_path: Path | None, checkpoint: dict | None, *, epochs: int,
                  seed: int, dev: torch.device, progress: bool, samples_per_class: int):
    """``train_generator(kind="diffusion")``: build, train (or resume) and finish the run (module docstring)."""
    from ipmcondense.nets import build_isolated, draw_seed

    from .runs import GeneratorRun, _finish

    rng = torch.Generator().manual_seed(int(seed))
    model = build_isolated(lambda: DiffusionGenerator(
        dataset.num_classes, dataset.channels, dataset.image_size, settings["width"], settings["timesteps"],
        settings["schedule"], settings["sample_steps"], settings["guidance"], dataset.mean, dataset.std),
        draw_seed(rng)).to(dev)
    ema = new_ema(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    history: dict[str, list[float]] = {"loss_diffusion": [], "epoch_seconds": []}
    epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["generator"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng.set_state(checkpoint["rng"])
        history = {k: list(v) for k, v in checkpoint["history"].items()}
        epoch = int(checkpoint["epoch"])
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    def save(e: int) -> None:
        if out_path is not None:
            save_diffusion_checkpoint(out_path, e, settings, model, ema, optimizer, rng, history)

    train_diffusion_epochs(model, ema, optimizer, dataset.train_images.to(dev), dataset.train_labels.to(dev),
                           epoch=epoch, epochs=epochs, batch_size=settings["batch_size"], rng=rng,
                           class_dropout=settings["class_dropout"], ema_decay=settings["ema_decay"], history=history,
                           on_epoch_end=save, progress=progress, desc=f"generator diffusion {dataset.name}")
    ema.eval()
    metrics = _finish(ema, dataset, history, settings, epochs, out_path, samples_per_class, dev)
    return GeneratorRun(ema, metrics, out_path)
