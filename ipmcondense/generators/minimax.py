r"""Minimax diffusion (Gu et al., CVPR 2024, arXiv 2311.15529): fine-tune a diffusion model so that its samples
are representative of and diverse within each class, then sample the condensed set from it.

Stage 1 is a class-conditional DDPM (``train_generator(kind="diffusion")``). Stage 2
(:func:`minimax_finetune`) keeps training it on the real data with its diffusion loss and adds two terms computed
on the embedding :math:`e = \hat x_0(x_t, t, y)` (the model's prediction of the clean image, flattened) against
two per-class FIFO memory banks of ``memory_size`` entries: :math:`R_c`, the last real images :math:`x_0` of class
:math:`c`, and :math:`G_c`, the last predictions :math:`\hat x_0` of class :math:`c`. For a mini-batch whose
classes form the set :math:`C_B` and :math:`E_c` its predictions of class :math:`c` (:func:`minimax_terms`):

.. math:: L = L_{\mathrm{diffusion}}
    + \frac{\lambda_{pos}}{|C_B|} \sum_{c \in C_B,\, G_c \ne \emptyset} \Big(1 - \min_{e \in E_c,\, r \in R_c} \cos(e, r)\Big)
    + \frac{\lambda_{neg}}{|C_B|} \sum_{c \in C_B,\, G_c \ne \emptyset} \max_{e \in E_c,\, g \in G_c} \cos(e, g).

The first (*representativeness*) pulls the predictions towards the **least** similar real image of the class, the
second (*diversity*) pushes them away from the **most** similar earlier prediction; both banks are updated with
the batch after the loss (:class:`MinimaxMemory`). Defaults as the official ``train_dit.py``: ``lambda_pos``
0.002, ``lambda_neg`` 0.008, ``memory_size`` 64, AdamW (``lr`` 1e-3, weight decay 0) on the DiffFit subset of
the weights (``trainable="difffit"``: biases, normalisation parameters and the class embedding), 8 epochs
(``run.sh``), class dropout kept on (DiT's label dropout), fine-tuning starting from the stage-1 EMA weights
with a fresh EMA. The result is a generator run directory: any number of images per class is sampled
afterwards (``evaluate DIR --ipc N``).

Relation to an IPM: the condensed set is a push-forward :math:`G_\#\mu_z` of the sampler; the diffusion loss fits
:math:`G_\#\mu_z` to the data distribution :math:`\nu` (a bound on a KL divergence, not an IPM), and the minimax
terms look at one *worst-case* pair per class, the way an IPM's supremum looks at one worst-case witness: the
representativeness term is :math:`\max_{e, r} (1 - \cos(e, r))`, the largest cosine distance from the generated
predictions to the real memory (a Hausdorff-type directed distance, not an IPM), and the diversity term the
largest similarity to earlier predictions.

Deviations from the official code (``vimar-gu/MinimaxDiffusion``): this library's small U-Net DDPM trained here
on pixels replaces the pretrained DiT-XL/2 in the Stable-Diffusion VAE latent space, so the embedding is the
predicted clean *image* (there: the predicted clean *latent*); the stage-1 run's batch size replaces the global
batch of 8 and its EMA decay replaces 0.9999 (a few hundred CPU steps here, 12000 there); the set is sampled with
the deterministic DDIM sampler of the generator (``sample_steps``, :math:`\eta = 0`, guidance of the stage-1
run) instead of 50 respaced ancestral steps with classifier-free guidance 4.0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ipmcondense.ipm._validation import check_choice, check_positive_int, check_positive_number

from .diffusion import DiffusionGenerator
from .diffusion_training import new_ema, save_diffusion_checkpoint, train_diffusion_epochs
from .runs import GeneratorRun, _check_out, _finish, load_stage_one

__all__ = ["minimax_terms", "MinimaxMemory", "minimax_finetune", "MINIMAX_TRAINABLE"]

#: The weights minimax fine-tuning may train, the DiffFit subset (official) or all of them.
MINIMAX_TRAINABLE = ("difffit", "all")
# name fragments of the DiffFit subset (official mark_difffit_trainable: bias, norm, gamma, y_embed)
_DIFFFIT_NAMES = ("bias", "norm", "class_embedding")


def _cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    return F.normalize(a.flatten(1), dim=1) @ F.normalize(b.flatten(1), dim=1).T


def minimax_terms(embeddings: Tensor, labels: Tensor, real_memory: Sequence[Tensor | None],
                  generated_memory: Sequence[Tensor | None], lambda_pos: float = 0.002,
                  lambda_neg: float = 0.008) -> tuple[Tensor, Tensor]:
    r"""The representativeness and diversity terms of the module docstring, ``(pos, neg)``.

    ``embeddings`` ``(B, ...)`` (flattened per row) with ``labels`` ``(B,)``; ``real_memory[c]`` and
    ``generated_memory[c]`` the banks of class ``c``, ``(m_c, d)`` tensors or ``None`` when empty. A class of the
    batch whose generated bank is empty adds nothing but still counts in :math:`|C_B|` (as the official code).
    Cost: :math:`O(B\, m\, d)`.
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"embeddings ({embeddings.shape[0]} rows) and labels ({labels.shape[0]}) must match")
    classes = [int(c) for c in torch.unique(labels)]
    pos = embeddings.new_zeros(())
    neg = embeddings.new_zeros(())
    for c in classes:
        bank_generated, bank_real = generated_memory[c], real_memory[c]
        if bank_generated is None or bank_generated.shape[0] == 0:
            continue
        e = embeddings[labels == c]
        pos = pos + (1 - _cosine_matrix(e, bank_real).min()) * (lambda_pos / len(classes))
        neg = neg + _cosine_matrix(e, bank_generated).max() * (lambda_neg / len(classes))
    return pos, neg


class MinimaxMemory:
    """Per-class FIFO banks of the last ``size`` real images and predictions (flattened, detached)."""

    def __init__(self, num_classes: int, size: int) -> None:
        self.size = check_positive_int(size, "memory_size")
        self.real: list[Tensor | None] = [None] * num_classes
        self.generated: list[Tensor | None] = [None] * num_classes

    def update(self, labels: Tensor, real: Tensor, generated: Tensor) -> None:
        """Append the batch's rows of each class to its banks and keep the last ``size`` of each."""
        for c in (int(c) for c in torch.unique(labels)):
            mask = labels == c
            for bank, rows in ((self.real, real[mask]), (self.generated, generated[mask])):
                rows = rows.detach().flatten(1)
                merged = rows if bank[c] is None else torch.cat([bank[c], rows])
                bank[c] = merged[-self.size:].clone()

    def state(self) -> dict[str, Any]:
        return {"real": list(self.real), "generated": list(self.generated)}

    def load(self, state: dict[str, Any]) -> None:
        self.real, self.generated = list(state["real"]), list(state["generated"])


def minimax_finetune(
    dataset: Any,
    generator_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    epochs: int = 8,
    lr: float = 1e-3,
    lambda_pos: float = 0.002,
    lambda_neg: float = 0.008,
    memory_size: int = 64,
    trainable: str = "difffit",
    batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    samples_per_class: int = 10,
) -> GeneratorRun:
    """Minimax fine-tuning (module docstring) of the stage-1 diffusion run ``generator_dir``; written to ``out``.

    ``resume=True`` continues ``out/checkpoint.pt`` bit-for-bit (the memory banks are in it). Cost per real
    mini-batch: one U-Net forward/backward pass plus :math:`O(B \\cdot memory\\_size \\cdot C H W)` for the terms.
    """
    epochs = check_positive_int(epochs, "epochs")
    lr = check_positive_number(lr, "lr")
    lambda_pos = check_positive_number(lambda_pos, "lambda_pos", allow_zero=True)
    lambda_neg = check_positive_number(lambda_neg, "lambda_neg", allow_zero=True)
    memory_size = check_positive_int(memory_size, "memory_size")
    trainable = check_choice(trainable, MINIMAX_TRAINABLE, "trainable")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    source = Path(generator_dir)
    stage_one = load_stage_one(source, "diffusion", "minimax diffusion needs a diffusion generator")
    base = stage_one["settings"]
    if base["dataset"] != dataset.name or base["image_shape"] != [dataset.channels, *dataset.image_size]:
        raise ValueError(
            f"generator run {str(source)!r} was trained on {base['dataset']!r} {base['image_shape']}, not on "
            f"{dataset.name!r} {[dataset.channels, *dataset.image_size]}"
        )
    batch_size = int(base["batch_size"]) if batch_size is None else check_positive_int(batch_size, "batch_size")
    settings = {**base, "seed": seed, "lr": lr, "batch_size": batch_size, "distilled": "minimax", "from": str(source),
                "lambda_pos": lambda_pos, "lambda_neg": lambda_neg, "memory_size": memory_size, "trainable": trainable}
    dev = torch.device(device or "cpu")
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise ValueError("resume=True needs out: the run directory whose checkpoint to continue")
    checkpoint = _check_out(out_path, resume, overwrite, settings) if out_path is not None else None

    model = DiffusionGenerator(dataset.num_classes, dataset.channels, dataset.image_size, int(base["width"]),
                               int(base["timesteps"]), base["schedule"], int(base["sample_steps"]),
                               float(base["guidance"]), dataset.mean, dataset.std).to(dev)
    model.load_state_dict(stage_one["ema"])  # the official fine-tuning starts from the pretrained EMA weights
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or any(k in name for k in _DIFFFIT_NAMES))
    ema = new_ema(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(int(seed))
    memory = MinimaxMemory(dataset.num_classes, memory_size)
    history: dict[str, list[float]] = {"loss_diffusion": [], "loss_representativeness": [], "loss_diversity": [],
                                       "epoch_seconds": []}
    epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["generator"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng.set_state(checkpoint["rng"])
        memory.load(checkpoint["memory"])
        history = {k: list(v) for k, v in checkpoint["history"].items()}
        epoch = int(checkpoint["epoch"])
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    def terms(x0: Tensor, x0_hat: Tensor, labels: Tensor) -> dict[str, Tensor]:
        pos, neg = minimax_terms(x0_hat.flatten(1), labels, memory.real, memory.generated, lambda_pos, lambda_neg)
        memory.update(labels, x0, x0_hat)
        return {"loss_representativeness": pos, "loss_diversity": neg}

    def save(e: int) -> None:
        if out_path is not None:
            save_diffusion_checkpoint(out_path, e, settings, model, ema, optimizer, rng, history,
                                      {"memory": memory.state()})

    train_diffusion_epochs(model, ema, optimizer, dataset.train_images.to(dev), dataset.train_labels.to(dev),
                           epoch=epoch, epochs=epochs, batch_size=batch_size, rng=rng,
                           class_dropout=float(base["class_dropout"]), ema_decay=float(base["ema_decay"]),
                           history=history, on_epoch_end=save, extra_terms=terms, progress=progress,
                           desc=f"minimax diffusion {dataset.name}")
    ema.eval()
    ema.requires_grad_(False)
    metrics = _finish(ema, dataset, history, settings, epochs, out_path, samples_per_class, dev)
    return GeneratorRun(ema, metrics, out_path)
