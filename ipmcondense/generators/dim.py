r"""DiM (Wang et al., arXiv 2303.04707): distil the dataset into the generator itself.

Stage 1 is a class-conditional GAN (:func:`ipmcondense.generators.train_generator`). Stage 2
(:func:`distill_into_generator`) fine-tunes that generator with its own discriminator and adds DiM's
**logit matching** over a pool of classifiers trained along the way. Per real mini-batch :math:`(x, y)` of
``batch_size`` images:

1. the epoch's match model :math:`f` (one architecture drawn per epoch from ``pool_archs``, freshly
   initialised, then kept for the epoch) takes ``match_train_steps`` SGD steps (``match_lr``, momentum 0.9,
   weight decay 5e-4) on real mini-batches with per-sample DSA augmentation;
2. generator step on :math:`-\mathbb E[D(G(z, y), y)] + w \cdot \mathrm{mean}\big((\log\mathrm{softmax}\, f(x)
   - \log\mathrm{softmax}\, f(G(z, y)))^2\big)`, each generated image paired with the real image of the same
   row and label (``match_weight`` :math:`w` = 0.01, DiM ``pool_match.py`` ``matchloss``, ``--match logit``);
3. discriminator step on the hinge loss (real batch vs :math:`G(z', y')` with fresh labels).

Adam(``lr`` = 5e-6, betas (0, 0.9)) for both networks, as DiM's stage 2. The result is a generator run
directory like stage 1's (``generator.pt``, ``checkpoint.pt`` (resumable), ``samples.png``, ``metrics.json``):
any number of images per class is sampled from it afterwards
(:func:`ipmcondense.condensation.api.evaluate` accepts the directory with ``ipc``).

Relation to an IPM: the GAN term is a learned-critic divergence (hinge loss; with a 1-Lipschitz critic it would be
a W1-type IPM, spectral normalisation only bounds the Lipschitz constant layer-wise); logit matching is a
pairwise squared distance of (real, generated) pairs, not an IPM.

Deviations from DiM's code: this library's DCGAN with a projection discriminator and the hinge loss replaces
DiM's ACGAN generator with a WGAN-GP auxiliary-classifier critic; the pool is the library's networks
(default ConvNet) instead of ConvNet/ResNet-10/18(-AP); real and generated images are not augmented for the
matching term (DiM's default ``--match-aug False``); evaluation samples a fixed set of ``ipc`` images per class
(DiM draws fresh samples every evaluation batch).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ipmcondense.ipm._validation import check_positive_int, check_positive_number
from ipmcondense.nets import NETWORK_NAMES, build_isolated, draw_seed, get_network

from .gan import ConditionalDiscriminator, ConditionalGenerator, hinge_losses
from .runs import (
    GeneratorRun,
    _check_out,
    _finish,
    _save_checkpoint,
    load_stage_one,
)

__all__ = ["distill_into_generator", "logit_matching_loss"]


def logit_matching_loss(real_logits, generated_logits, weight: float = 0.01):
    r"""DiM's ``--match logit`` term: :math:`w \cdot \mathrm{mean}\big((\log\mathrm{softmax}(a) - \log\mathrm{softmax}(b))^2\big)`,
    the mean over every row and class of the paired ``(B, C)`` logits."""
    return weight * (F.log_softmax(real_logits, dim=1) - F.log_softmax(generated_logits, dim=1)).pow(2).mean()


def distill_into_generator(
    dataset: Any,
    generator_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    epochs: int = 10,
    lr: float = 5e-6,
    match_weight: float = 0.01,
    match_train_steps: int = 16,
    match_lr: float = 0.01,
    pool_archs: Sequence[str] = ("convnet",),
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    samples_per_class: int = 10,
) -> GeneratorRun:
    """DiM's stage 2 (module docstring) from the stage-1 run ``generator_dir``; the run is written to ``out``.

    Defaults from DiM ``pool_match.py``: ``lr`` 5e-6 (Adam betas (0, 0.9)), ``match_weight`` 0.01 (hard-coded
    there), ``match_train_steps`` 16 (``--epochs-match-train``), ``match_lr`` 0.01 (``--eval-lr``); ``epochs``
    10 (DiM: 100). The batch size, latent size and width are the stage-1 run's. Cost per real mini-batch: one
    generator and two discriminator forward/backward passes plus ``match_train_steps + 2`` match-model passes.
    """
    epochs = check_positive_int(epochs, "epochs")
    lr = check_positive_number(lr, "lr")
    match_weight = check_positive_number(match_weight, "match_weight", allow_zero=True)
    match_train_steps = check_positive_int(match_train_steps, "match_train_steps", allow_zero=True)
    match_lr = check_positive_number(match_lr, "match_lr")
    pool_archs = tuple(pool_archs)
    if not pool_archs or any(a not in NETWORK_NAMES for a in pool_archs):
        raise ValueError(f"pool_archs must be a non-empty list of network names from {NETWORK_NAMES}, got {pool_archs}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    source = Path(generator_dir)
    stage_one = load_stage_one(source, "gan", "DiM fine-tunes a GAN with its discriminator")
    base = stage_one["settings"]
    if base["dataset"] != dataset.name or base["image_shape"] != [dataset.channels, *dataset.image_size]:
        raise ValueError(
            f"generator run {str(source)!r} was trained on {base['dataset']!r} {base['image_shape']}, not on "
            f"{dataset.name!r} {[dataset.channels, *dataset.image_size]}"
        )
    settings = {**base, "kind": "gan", "seed": seed, "lr": lr, "distilled": "dim", "from": str(source),
                "match_weight": match_weight, "match_train_steps": match_train_steps, "match_lr": match_lr,
                "pool_archs": list(pool_archs)}
    dev = torch.device(device or "cpu")
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise ValueError("resume=True needs out: the run directory whose checkpoint to continue")
    checkpoint = _check_out(out_path, resume, overwrite, settings) if out_path is not None else None

    channels, size, latent_dim = dataset.channels, dataset.image_size, int(base["latent_dim"])
    generator = ConditionalGenerator(latent_dim, dataset.num_classes, channels, size, int(base["width"]),
                                     dataset.mean, dataset.std).to(dev)
    critic = ConditionalDiscriminator(dataset.num_classes, channels, size, int(base["width"])).to(dev)
    state = checkpoint if checkpoint is not None else stage_one
    generator.load_state_dict(state["generator"])
    critic.load_state_dict(state["discriminator"])
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.0, 0.9))
    rng = torch.Generator().manual_seed(int(seed))
    history: dict[str, list[float]] = {"loss_d": [], "loss_g": [], "loss_match": [], "epoch_seconds": []}
    epoch = 0
    if checkpoint is not None:
        opt_g.load_state_dict(checkpoint["optimizer_g"])
        opt_d.load_state_dict(checkpoint["optimizer_d"])
        rng.set_state(checkpoint["rng"])
        history = {k: list(v) for k, v in checkpoint["history"].items()}
        epoch = int(checkpoint["epoch"])
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    from ipmcondense.augment import DifferentiableSiameseAugmentation, dsa_strategy_for

    augment = DifferentiableSiameseAugmentation(dsa_strategy_for(dataset))
    images, labels = dataset.train_images.to(dev), dataset.train_labels.to(dev)
    n, batch_size = images.shape[0], int(base["batch_size"])
    steps = max(1, n // batch_size)
    bar = tqdm(total=epochs, initial=epoch, disable=not progress, desc=f"DiM {dataset.name}", unit="epoch",
               dynamic_ncols=True)
    try:
        while epoch < epochs:
            start = time.perf_counter()
            arch = pool_archs[int(torch.randint(len(pool_archs), (1,), generator=rng))]
            model = build_isolated(lambda: get_network(arch, channels, dataset.num_classes, size), draw_seed(rng)).to(dev)
            opt_model = torch.optim.SGD(model.parameters(), lr=match_lr, momentum=0.9, weight_decay=5e-4)
            generator.train()
            critic.train()
            order = torch.randperm(n, generator=rng)
            sums = [0.0, 0.0, 0.0]
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size].to(dev)
                real, y = images[idx], labels[idx]
                for _ in range(match_train_steps):  # DiM train_match_model: real batches, per-sample augmentation
                    pick = torch.randint(n, (batch_size,), generator=rng).to(dev)
                    loss_m = F.cross_entropy(model(augment(images[pick], rng)), labels[pick])
                    opt_model.zero_grad(set_to_none=True)
                    loss_m.backward()
                    opt_model.step()
                z = torch.randn(real.shape[0], latent_dim, generator=rng).to(dev)
                fake = generator(z, y)
                with torch.no_grad():
                    real_logits = model(real)
                match = logit_matching_loss(real_logits, model(fake), match_weight)
                loss_g = -critic(fake, y).mean() + match
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                y2 = torch.randint(dataset.num_classes, (real.shape[0],), generator=rng).to(dev)
                z2 = torch.randn(real.shape[0], latent_dim, generator=rng).to(dev)
                with torch.no_grad():
                    fake2 = generator(z2, y2)
                loss_d = hinge_losses(critic(real, y), critic(fake2, y2))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                values = (loss_d.item(), loss_g.item(), match.item())
                if not all(math.isfinite(v) for v in values):
                    raise FloatingPointError(f"the DiM losses became non-finite at epoch {epoch}; lower lr (now {lr})")
                sums = [a + b for a, b in zip(sums, values)]
            epoch += 1
            for key, total in zip(("loss_d", "loss_g", "loss_match"), sums):
                history[key].append(total / steps)
            history["epoch_seconds"].append(time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(match=f"{sums[2] / steps:.4g}")
            if out_path is not None:
                _save_checkpoint(out_path, epoch, settings, generator, critic, opt_g, opt_d, rng, history)
    finally:
        bar.close()
    generator.eval()
    generator.requires_grad_(False)
    metrics = _finish(generator, dataset, history, settings, epochs, out_path, samples_per_class, dev)
    return GeneratorRun(generator, metrics, out_path)
