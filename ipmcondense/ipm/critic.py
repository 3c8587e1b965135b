"""Neural IPMs: a trained critic network as the witness, with Lipschitz control (WGAN style).

The IPM over a class of networks :math:`F = \\{ f_\\theta \\}` is estimated by gradient ascent on

.. math::

    \\hat d_F(x, y) = \\max_\\theta \\; \\frac1n \\sum_i f_\\theta(x_i) - \\frac1m \\sum_j f_\\theta(y_j),

with the Lipschitz constant of :math:`f_\\theta` kept near one in one of three ways:

* ``"gp"`` (WGAN-GP, Gulrajani et al. 2017): the two-sided penalty
  :math:`\\lambda\\, E_{\\hat z} (\\|\\nabla f(\\hat z)\\|_2 - 1)^2` on random interpolates
  :math:`\\hat z = t x + (1 - t) y`, :math:`t \\sim U(0, 1)` (soft constraint);
* ``"spectral"`` (Miyato et al. 2018): every ``nn.Linear`` weight divided by its largest singular
  value (power iteration); with 1-Lipschitz activations the network is 1-Lipschitz;
* ``"clip"`` (WGAN, Arjovsky et al. 2017): every parameter clipped to ``[-c, c]`` after each step;
  this bounds the Lipschitz constant by an unknown ``K``, so the value is only proportional to W1.

By Kantorovich-Rubinstein duality :math:`W_1(\\mu, \\nu) = \\sup_{\\mathrm{Lip}(f) \\le 1} E_\\mu f - E_\\nu f`,
so with a 1-Lipschitz critic the value is a **lower bound of the empirical** :math:`W_1` (the critic
class is smaller than all 1-Lipschitz functions and training may stop short of the supremum). It is
computed on the same samples the critic was trained on, hence optimistically biased as an estimate of
the population quantity. The gradient penalty is a soft constraint, so ``"gp"`` values exceed
:math:`W_1` by a predictable amount: for two samples that differ by a shift, the critic of slope
:math:`s` along the shift scores :math:`s W_1 - \\lambda (s - 1)^2`, maximised at
:math:`s = 1 + W_1 / (2\\lambda)`. The penalised objective is then :math:`W_1 + W_1^2 / (4\\lambda)`,
but the returned value is the mean gap **without** the penalty, :math:`s W_1 = W_1 + W_1^2 / (2\\lambda)`.

A ReLU critic can collapse to a constant (every unit dead for every input): its mean gap is then 0
and no gradient can revive it. :meth:`NeuralIPM.fit` detects this (the trained critic takes one value
on all of ``x`` and ``y``), sets ``NeuralIPMResult.collapsed`` and warns; the value 0 is then a
failure of training, not an estimate. Another ``seed``, a lower ``lr`` or ``"spectral"`` usually avoids it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ._validation import as_point_pair, check_choice, check_positive
from .witness import Witness

__all__ = ["NeuralIPM", "NeuralIPMResult", "gradient_penalty", "neural_ipm", "default_critic"]

CONSTRAINTS = ("gp", "spectral", "clip")


def default_critic(dim: int, hidden: int | None = None, generator: torch.Generator | None = None) -> nn.Module:
    """A small MLP critic ``d -> h -> h -> 1`` with ReLU activations and no normalisation layers.

    ``hidden`` defaults to ``min(256, max(64, 2 d))``. Weights and biases are drawn from
    :math:`U(-1/\\sqrt{\\text{fan\\_in}}, 1/\\sqrt{\\text{fan\\_in}})` (PyTorch's default range) with
    ``generator``, so the initialisation is reproducible without touching the global RNG.
    """
    if int(dim) < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    width = int(hidden) if hidden is not None else min(256, max(64, 2 * int(dim)))
    if width < 1:
        raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(dim), width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 1),
    )
    with torch.no_grad():
        for module in mlp:
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
    return mlp


def _critic_values(critic: nn.Module, z: Tensor) -> Tensor:
    out = critic(z)
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() != 1 or out.shape[0] != z.shape[0]:
        raise ValueError(
            f"the critic must map a batch of {z.shape[0]} points to {z.shape[0]} scalars "
            f"(shape (k,) or (k, 1)), got shape {tuple(out.shape)}"
        )
    return out


def _is_constant(values: Tensor) -> bool:
    """Whether the critic's values spread by at most 1e-6 times their magnitude (floored at 1)."""
    scale = max(1.0, float(values.abs().max()))
    return float(values.max() - values.min()) <= 1e-6 * scale


def _random_pairs(
    x: Tensor, y: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair min(n, m) random points of x with as many of y and draw one t ~ U(0, 1) per pair."""
    k = min(x.shape[0], y.shape[0])
    gen_device = generator.device if generator is not None else x.device
    if x.shape[0] != k:
        x = x[torch.randperm(x.shape[0], generator=generator, device=gen_device)[:k].to(x.device)]
    if y.shape[0] != k:
        y = y[torch.randperm(y.shape[0], generator=generator, device=gen_device)[:k].to(x.device)]
    t = torch.rand(k, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    return x, y, t


def gradient_penalty(
    critic: nn.Module, x: Any, y: Any, generator: torch.Generator | None = None
) -> Tensor:
    """The two-sided WGAN-GP penalty :math:`E_{\\hat z} (\\|\\nabla_z f(\\hat z)\\|_2 - 1)^2`.

    :math:`\\hat z_i = t_i x_i + (1 - t_i) y_i` with :math:`t_i \\sim U(0, 1)`. When ``n != m``,
    ``min(n, m)`` points of each sample are drawn at random (without replacement) and paired. The
    input gradient is taken with ``create_graph=True``, so the returned penalty is differentiable with
    respect to the critic's parameters (and to ``x``, ``y``): adding it to a loss and calling
    ``backward`` changes the critic. Critics with BatchNorm mix the samples of a batch, so the
    per-sample gradient is not what the penalty assumes; use LayerNorm or none.

    Args:
        critic: maps a batch ``(k, ...)`` to ``(k,)`` or ``(k, 1)`` values; needs double backward.
        x, y: samples with the same per-point shape (images are kept unflattened).
        generator: optional ``torch.Generator`` for the pairing and the interpolation weights.

    Returns:
        A 0-d tensor; it costs one forward and one double-backward pass of the critic on ``min(n, m)`` points.
    """
    a, b = as_point_pair(x, y, flatten=False)
    a, b, t = _random_pairs(a, b, generator)
    t = t.reshape(-1, *([1] * (a.dim() - 1)))
    z = (t * a + (1 - t) * b)
    if not z.requires_grad:
        z = z.detach().requires_grad_(True)
    values = _critic_values(critic, z)
    (grad,) = torch.autograd.grad(values.sum(), z, create_graph=True)
    norms = grad.reshape(grad.shape[0], -1).norm(dim=1)
    return (norms - 1).pow(2).mean()


@dataclass
class NeuralIPMResult:
    """Outcome of :meth:`NeuralIPM.fit`.

    Attributes:
        value: :math:`\\frac1n \\sum f(x_i) - \\frac1m \\sum f(y_j)` for the trained critic on all of
            ``x`` and ``y`` (0-d tensor). Differentiable with respect to ``x`` and ``y`` with the
            critic held fixed (envelope theorem), not with respect to the critic's parameters.
        witness: the trained critic as a :class:`Witness` (points flattened, reshaped for the critic).
        critic: the trained critic module (a copy; the module given to :class:`NeuralIPM` is untouched).
        history: per step ``"mean_gap"`` (on the minibatch) and ``"penalty"`` (0 unless ``"gp"``).
        collapsed: ``True`` when the trained critic is constant on all of ``x`` and ``y`` (its values
            spread by at most ``1e-6`` times their magnitude, floored at 1): the value is then 0 because
            training failed, and :meth:`NeuralIPM.fit` has issued a ``RuntimeWarning``.
    """

    value: Tensor
    witness: Witness
    critic: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    collapsed: bool = False


class NeuralIPM:
    """Estimate an IPM over a class of neural networks by training a critic (see the module docstring).

    Args:
        critic: the network ``(k, ...) -> (k,)`` or ``(k, 1)``; ``None`` builds :func:`default_critic`
            sized to the flattened point dimension. The module is deep-copied at each :meth:`fit`.
            A warning is issued if it contains BatchNorm (it breaks the per-sample Lipschitz control).
        constraint: ``"gp"`` (gradient penalty), ``"spectral"`` (spectral normalisation of every
            ``nn.Linear``) or ``"clip"`` (weight clipping).
        steps: number of Adam steps.
        lr: Adam learning rate (betas ``(0.5, 0.9)`` as in WGAN-GP).
        penalty_weight: :math:`\\lambda` of the gradient penalty (``"gp"`` only).
        clip_value: ``c`` of weight clipping (``"clip"`` only).
        batch_size: points of each sample per step; ``None`` uses all points (full batch).
        seed: seeds the default critic's initialisation, the minibatches and the interpolates;
            ``None`` draws a seed from the global torch RNG (so ``torch.manual_seed`` governs it).

    Cost: ``steps`` forward/backward passes on ``2 * batch_size`` points (plus a double backward for
    ``"gp"``). Memory: that of one such pass.
    """

    def __init__(
        self,
        critic: nn.Module | None = None,
        constraint: str = "gp",
        steps: int = 500,
        lr: float = 1e-3,
        penalty_weight: float = 10.0,
        clip_value: float = 0.01,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        if critic is not None and not isinstance(critic, nn.Module):
            raise TypeError(f"critic must be an nn.Module or None, got {type(critic).__name__}")
        self.critic = critic
        self.constraint = check_choice(constraint, CONSTRAINTS, "constraint")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.steps = steps
        self.lr = check_positive(lr, "lr")
        self.penalty_weight = check_positive(penalty_weight, "penalty_weight", allow_zero=True)
        self.clip_value = check_positive(clip_value, "clip_value")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        self.batch_size = batch_size
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        if critic is not None and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules()
        ):
            warnings.warn(
                "the critic contains BatchNorm: it couples the points of a batch, so the gradient "
                "penalty and the Lipschitz control no longer apply per point; use LayerNorm or no "
                "normalisation",
                UserWarning,
                stacklevel=2,
            )

    def _build_critic(self, a: Tensor, generator: torch.Generator) -> nn.Module:
        dim = int(a[0].numel())
        if self.critic is None:
            critic = default_critic(dim, generator=generator)
        else:
            critic = copy.deepcopy(self.critic)
        critic = critic.to(device=a.device, dtype=a.dtype)
        if self.constraint == "spectral":
            for name, module in list(critic.named_modules()):
                if isinstance(module, nn.Linear):
                    spectral_norm(module)
        return critic

    def _batch(self, points: Tensor, generator: torch.Generator) -> Tensor:
        if self.batch_size is None or self.batch_size >= points.shape[0]:
            return points
        idx = torch.randperm(points.shape[0], generator=generator)[: self.batch_size]
        return points[idx.to(points.device)]

    def fit(self, x: Any, y: Any) -> NeuralIPMResult:
        """Train a fresh copy of the critic on ``x`` versus ``y`` and return the estimate.

        The critic maximises the mean gap :math:`\\frac1n \\sum f(x_i) - \\frac1m \\sum f(y_j)`
        (minus the penalty for ``"gp"``); ``x`` and ``y`` are detached for training. Afterwards the
        critic is put in ``eval()`` mode (spectral normalisation then stops its power iteration).
        """
        a, b = as_point_pair(x, y, flatten=False)
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        generator = torch.Generator().manual_seed(seed)
        critic = self._build_critic(a, generator)
        critic.train()
        params = [p for p in critic.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the critic has no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=self.lr, betas=(0.5, 0.9))
        a_data, b_data = a.detach(), b.detach()
        history: dict[str, list[float]] = {"mean_gap": [], "penalty": []}
        for _ in range(self.steps):
            xb, yb = self._batch(a_data, generator), self._batch(b_data, generator)
            gap = _critic_values(critic, xb).mean() - _critic_values(critic, yb).mean()
            loss = -gap
            penalty = torch.zeros((), dtype=gap.dtype, device=gap.device)
            if self.constraint == "gp" and self.penalty_weight > 0:
                penalty = gradient_penalty(critic, xb, yb, generator=generator)
                loss = loss + self.penalty_weight * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if self.constraint == "clip":
                with torch.no_grad():
                    for p in params:
                        p.clamp_(-self.clip_value, self.clip_value)
            history["mean_gap"].append(float(gap.detach()))
            history["penalty"].append(float(penalty.detach()))
        optimizer.zero_grad(set_to_none=True)
        critic.eval()
        frozen = {name: p.detach() for name, p in critic.named_parameters()}
        point_shape = tuple(a.shape[1:])

        def fixed_critic(z: Tensor) -> Tensor:
            out = torch.func.functional_call(critic, frozen, (z,))
            return out[:, 0] if out.dim() == 2 and out.shape[1] == 1 else out

        values_a, values_b = fixed_critic(a), fixed_critic(b)
        value = values_a.mean() - values_b.mean()
        if not bool(torch.isfinite(value.detach())):
            raise ValueError(
                "the critic diverged (non-finite value); lower lr or use another constraint"
            )
        collapsed = _is_constant(torch.cat([values_a.detach(), values_b.detach()]))
        if collapsed:
            warnings.warn(
                "the critic collapsed to a constant on x and y (every ReLU unit dead), so the value "
                f"{float(value.detach()):.3g} is a failed fit, not an estimate of the IPM; "
                "use another seed, a lower lr or constraint='spectral'",
                RuntimeWarning,
                stacklevel=2,
            )

        def witness_fn(z: Tensor) -> Tensor:
            return fixed_critic(z.reshape(z.shape[0], *point_shape))

        witness = Witness(witness_fn, metric="neural_ipm", dim=int(a[0].numel()))
        return NeuralIPMResult(
            value=value, witness=witness, critic=critic, history=history, collapsed=collapsed
        )


def neural_ipm(
    x: Any,
    y: Any,
    critic: nn.Module | None = None,
    constraint: str = "gp",
    steps: int = 500,
    lr: float = 1e-3,
    penalty_weight: float = 10.0,
    clip_value: float = 0.01,
    batch_size: int | None = None,
    seed: int | None = None,
) -> Tensor:
    """Functional shortcut: ``NeuralIPM(...).fit(x, y).value`` (a 0-d tensor).

    The value is :math:`\\mathbb E_x f(x) - \\mathbb E_y f(y)` for the trained critic :math:`f` (a lower bound
    of the IPM over the critic class, estimated on the given samples). Cost: ``steps`` critic updates of
    ``batch_size`` points per side (plus the gradient-penalty pass when used), then one pass over both sets.

    With a 1-Lipschitz critic (``"spectral"``, approximately ``"gp"``) this is a lower bound of the
    empirical :math:`W_1(x, y)`, estimated on the training samples (biased). See :class:`NeuralIPM`.
    """
    return NeuralIPM(
        critic=critic,
        constraint=constraint,
        steps=steps,
        lr=lr,
        penalty_weight=penalty_weight,
        clip_value=clip_value,
        batch_size=batch_size,
        seed=seed,
    ).fit(x, y).value
