r"""Bilevel objectives: DD (unrolled back-propagation through training) and RCIG (implicit differentiation).

Both minimise the real-data loss of a model fitted on S. DD differentiates through ``dd_steps``
unrolled SGD steps (:func:`ipmcondense.autodiff.unrolled_sgd`); RCIG solves a convex last-layer inner
problem and takes the implicit hypergradient (:func:`ipmcondense.autodiff.implicit_hypergradient`).

The pieces of the published RCIG step (Loo et al. ICML'23, yolky/RCIG) are here and tested on their own:
:func:`linearised_forward` (the pool network linearised around its online-trained weights),
:func:`krr_head_predictions` (the last layer as closed-form kernel ridge regression on the features),
:func:`rcig_krr_loss` (cross-entropy with a learned temperature) and :func:`clip_implicit_gradients`
(the implicit gradient's norm clipped to the direct gradient's). The ``rcig`` row does not use them yet:
it still solves a logistic last layer on frozen random-network features (issue 11, item 2, open).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.autodiff import (
    FlatParameters,
    UnrollPlan,
    flatten_parameters,
    functional_forward,
    implicit_hypergradient,
    sgd_step,
    unrolled_sgd,
)
from ipmcondense.components import option
from ipmcondense.evaluation import LearnedSchedule
from ipmcondense.features import segments_from_labels
from ipmcondense.ipm._validation import check_choice
from ipmcondense.nets import build_isolated

from .base import Objective, ObjectiveContext, check_options, draw_network

__all__ = [
    "UnrolledBilevelObjective",
    "dd_step_batches",
    "ImplicitBilevelObjective",
    "unrolled_task_loss",
    "inner_linear_loss",
    "solve_inner_linear",
    "linearised_forward",
    "krr_head_predictions",
    "rcig_krr_loss",
    "clip_implicit_gradients",
]


def dd_step_batches(labels: Tensor, steps: int) -> list[Tensor]:
    r"""DD's synthetic batches: ``steps`` class-balanced batches of a class-blocked set, one per unrolled step.

    The reference (ssnl/dataset-distillation ``train_distilled_image.py``) holds ``distill_steps`` separate
    batches of ``distilled_images_per_class_per_step`` images per class. Here the ``k`` images of every
    class are dealt round-robin: batch ``i`` holds, per class, the images of in-class index
    :math:`j \equiv i \pmod{\text{steps}}` (``k = steps``: one image per class per step, the reference's
    default; ``k = 5 \cdot steps``: five). With fewer images than steps (``k < steps``) batch ``i`` is the
    image of index :math:`i \bmod k` of every class (images are reused; the reference cannot express this).
    Returns ``steps`` index tensors into the set, class-blocked. Cost: ``O(n)``.
    """
    segments = segments_from_labels(labels)
    per_class = [torch.arange(s.start, s.stop, device=labels.device) for s in segments]
    batches = []
    for i in range(int(steps)):
        parts = []
        for indices in per_class:
            k = indices.numel()
            parts.append(indices[i::steps] if k >= steps else indices[i % k : i % k + 1])
        batches.append(torch.cat(parts))
    return batches


def unrolled_task_loss(
    net: nn.Module,
    flat_params_start: Tensor,
    images: Tensor,
    labels: Tensor,
    raw_lrs: Tensor,
    real_images: Tensor,
    real_labels: Tensor,
    step_batches: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""DD's outer loss :math:`\mathrm{CE}(f_{\theta_N}(X_T), Y_T)` after ``N = len(raw_lrs)`` unrolled SGD steps on S.

    :math:`\theta_{t+1} = \theta_t - \mathrm{softplus}(r_t) \nabla_\theta \mathrm{CE}(f_{\theta_t}(X_{B_t}), Y_{B_t})`
    with :math:`B_t` = ``step_batches[t]`` (DD: step ``t`` of epoch ``e`` uses batch ``t mod steps``; ``None``:
    the whole set every step), differentiable in the images and the raw step sizes :math:`r` (the
    hypergradient, through Hessian-vector products). Cost: N forward + backward passes on the step batches,
    the meta-backward, one forward on the real batch.
    """
    lrs = F.softplus(raw_lrs)
    if step_batches is None:
        end = unrolled_sgd(net, flat_params_start, images, labels, lrs, int(raw_lrs.numel()))
    else:
        if len(step_batches) != raw_lrs.numel():
            raise ValueError(f"step_batches must hold one batch per step size ({raw_lrs.numel()}), "
                             f"got {len(step_batches)}")
        layout = FlatParameters(net)
        plan = UnrollPlan(tuple(step_batches), (None,) * len(step_batches))
        end = flat_params_start.detach().requires_grad_(True)
        for t in range(len(step_batches)):
            end = sgd_step(net, layout, end, images, labels, lrs[t], plan, t, None, True)
    return F.cross_entropy(functional_forward(net, end, real_images), real_labels)


class UnrolledBilevelObjective(Objective):
    r"""DD: dataset distillation by back-propagation through training (Wang et al. 2018).

    S is dealt into ``dd_steps`` class-balanced batches (:func:`dd_step_batches`); the unroll runs
    ``dd_epochs`` passes over them, :math:`T = \text{dd\_steps} \cdot \text{dd\_epochs}` SGD steps, step
    ``t`` on batch ``t mod dd_steps`` with its own learnable step size
    :math:`\eta_t = \mathrm{softplus}(r_t)` (init ``dd_lr_init``, own step ``lr_lrs``): the reference's
    10 steps x 3 epochs = 30 learned rates. Each image step: :math:`\theta_0` = a fresh initialisation from
    the sampler (``dd_init="fresh"``, the reference's ``unknown_init``) or one initialisation fixed for the
    run (``"fixed"``); the loss is :func:`unrolled_task_loss` on a class-balanced real batch. The learned
    schedule (batches and step sizes, :meth:`learned_schedule`) is saved with the set, and the evaluation
    replays it on fresh networks (the reference's ``evaluate_steps``).

    **Relation to an IPM**: none: a performance-oriented bilevel objective (the real-data loss of the
    network trained on S).

    Cost: ``T`` forward + backward passes on the step batches with graphs kept (memory linear in ``T``).
    """

    name = "dd"
    relation_to_ipm = "not an IPM: bilevel objective (real-data loss after unrolled training on S)"
    default_sampler = "fresh"

    @dataclass(frozen=True)
    class Options:
        dd_steps: int = option(10, "ssnl/dataset-distillation: --distill_steps 10 (synthetic batches)")
        dd_epochs: int = option(1, "1: each batch once; the dd row sets ssnl's --distill_epochs 3")
        dd_lr_init: float = option(0.02, "ssnl/dataset-distillation: --distill_lr 0.02")
        lr_lrs: float = option(0.01, "ssnl: the raw step sizes share the images' Adam, --lr 0.01")
        dd_init: str = option("fresh", "ssnl/dataset-distillation: unknown_init (a fresh network per step)")

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        steps = int(ctx.config["dd_steps"])
        total = steps * int(ctx.config["dd_epochs"])
        init = float(ctx.config["dd_lr_init"])
        raw = math.log(math.expm1(init))  # softplus^{-1}
        self.raw_lrs = nn.Parameter(torch.full((total,), raw, device=ctx.device))
        batches = dd_step_batches(ctx.synthetic.labels.to(ctx.device), steps)
        self.step_batches = [batches[t % steps] for t in range(total)]
        self.template = build_isolated(ctx.build_network).to(ctx.device)
        self.fixed_start = None
        if ctx.config["dd_init"] == "fixed":
            self.fixed_start = flatten_parameters(draw_network(ctx))

    @classmethod
    def prepare_config(cls, config, dataset):
        check_options(config, ("dd_lr_init", "lr_lrs"), integers=("dd_steps", "dd_epochs"))
        check_choice(config["dd_init"], ("fresh", "fixed"), "dd_init")
        return config

    def parameter_groups(self):
        return [{"params": [self.raw_lrs], "lr": float(self.config["lr_lrs"])}]

    def learned_step_sizes(self) -> Tensor:
        r""":math:`\mathrm{softplus}(r)`, the current per-step learning rates (``dd_steps * dd_epochs``)."""
        return F.softplus(self.raw_lrs.detach())

    def learned_schedule(self) -> LearnedSchedule:
        """The training the set was distilled for: step ``t`` on ``step_batches[t]`` with step size ``eta_t``."""
        return LearnedSchedule(
            batches=tuple(tuple(int(i) for i in b.tolist()) for b in self.step_batches),
            step_sizes=tuple(float(v) for v in self.learned_step_sizes().cpu().tolist()),
        )

    def loss(self, networks):
        ctx = self.ctx
        if self.fixed_start is not None:
            start = self.fixed_start
        else:
            if not networks:
                raise ValueError("objective 'dd' with dd_init='fresh' needs a sampler that draws networks")
            start = flatten_parameters(networks[0])
        real, real_labels = ctx.real_batches.sample(int(self.config["batch_real"]))
        return unrolled_task_loss(
            self.template, start, ctx.synthetic.images(), ctx.synthetic.labels, self.raw_lrs, real, real_labels,
            step_batches=self.step_batches,
        )

    def check_after_step(self, iteration):
        if not bool(torch.isfinite(self.raw_lrs.detach()).all()):
            raise FloatingPointError(f"the learned step sizes of 'dd' became non-finite at iteration {iteration}")

    def state_dict(self):
        state = {"raw_lrs": self.raw_lrs.detach().cpu().clone()}
        if self.fixed_start is not None:
            state["fixed_start"] = self.fixed_start.detach().cpu().clone()
        return state

    def load_state_dict(self, state):
        with torch.no_grad():
            self.raw_lrs.copy_(state["raw_lrs"])
        if "fixed_start" in state:
            self.fixed_start = state["fixed_start"].to(self.ctx.device)


def inner_linear_loss(weights: Tensor, features: Tensor, targets: Tensor, l2: float, loss: str = "ce") -> Tensor:
    r"""RCIG's convex inner problem on features: a linear model :math:`X W` with ridge :math:`\tfrac{l_2}2\|W\|^2`.

    ``loss="ce"``: :math:`\mathrm{mean}_i\, \mathrm{CE}(x_i^\top W, y_i)` (multinomial logistic regression,
    ``targets`` class indices); ``"mse"``: :math:`\tfrac12 \mathrm{mean}_i \|x_i^\top W - y_i\|^2` (ridge
    regression, ``targets`` ``(n, C)``). Strongly convex in ``W`` for ``l2 > 0``.
    """
    out = features @ weights
    if loss == "ce":
        value = F.cross_entropy(out, targets)
    else:
        value = 0.5 * ((out - targets) ** 2).sum(1).mean()
    return value + 0.5 * l2 * (weights * weights).sum()


def solve_inner_linear(features: Tensor, targets: Tensor, l2: float, loss: str = "ce", iterations: int = 100) -> Tensor:
    """The minimiser of :func:`inner_linear_loss` (closed form for ``"mse"``, L-BFGS for ``"ce"``); detached."""
    x = features.detach()
    d = x.shape[1]
    if loss == "mse":
        n = x.shape[0]
        system = x.T @ x / n + l2 * torch.eye(d, dtype=x.dtype, device=x.device)
        return torch.linalg.solve(system, x.T @ targets.to(x.dtype) / n)
    num_classes = int(targets.max()) + 1 if targets.dim() == 1 else targets.shape[1]
    w = torch.zeros(d, max(num_classes, 2), dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=int(iterations), tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = inner_linear_loss(w, x, targets, l2, loss)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def linearised_forward(net: nn.Module, base_params: Tensor, tangent: Tensor, x: Tensor) -> Tensor:
    r"""The network linearised around ``base_params``: :math:`f_{lin}(x) = f(x; \theta_0) + J_\theta f(x; \theta_0)\, \delta`.

    RCIG's inner model (Loo et al. 2023, ``get_linear_forward`` of yolky/RCIG): the pool model's weights
    :math:`\theta_0` (``base_params``, a flat vector as :func:`~ipmcondense.autodiff.flatten_parameters`)
    stay fixed in the inner problem and only the tangent offset :math:`\delta` (``tangent``, same shape,
    zero at a reset) is trained. Exact at :math:`\delta = 0` and linear in :math:`\delta`; differentiable in
    ``x``, ``tangent`` and ``base_params``. Cost: one forward-mode JVP (about two forward passes).
    """
    if base_params.shape != tangent.shape:
        raise ValueError(f"tangent must have the shape of base_params {tuple(base_params.shape)}, "
                         f"got {tuple(tangent.shape)}")
    value, directional = torch.func.jvp(lambda p: functional_forward(net, p, x), (base_params,), (tangent,))
    return value + directional


def krr_head_predictions(
    features_support: Tensor,
    outputs_support: Tensor,
    labels_support: Tensor,
    features_target: Tensor,
    outputs_target: Tensor,
    l2: float,
) -> Tensor:
    r"""RCIG's last layer in closed form: kernel ridge regression on the features, around the network outputs.

    .. math:: \hat Y_T = f_T + K_{TS} (K_{SS} + l_2 I)^{-1} (Y_S - f_S), \qquad K_{AB} = \Phi_A \Phi_B^\top,

    with :math:`\Phi` the last-layer features (``(n, d)``, ``(m, d)``) and :math:`f` the network outputs
    (``(n, C)``, ``(m, C)``): the predictions of the last layer refitted on S with ridge :math:`l_2`
    (absolute, as RCIG's ``l2`` on :math:`K_{SS}`), solved in float64. Cost: :math:`O(n^2 d + nmd + n^3)`.
    """
    if float(l2) < 0:
        raise ValueError(f"l2 must be non-negative, got {l2!r}")
    fs, ft = features_support.double(), features_target.double()
    k_ss = fs @ fs.T
    k_ts = ft @ fs.T
    system = k_ss + float(l2) * torch.eye(k_ss.shape[0], dtype=k_ss.dtype, device=k_ss.device)
    residual = labels_support.double() - outputs_support.double()
    return outputs_target.double() + k_ts @ torch.linalg.solve(system, residual)


def rcig_krr_loss(predictions: Tensor, target_labels: Tensor, log_temperature: Tensor) -> Tensor:
    r"""RCIG's outer loss: :math:`\mathrm{mean}_i\, \mathrm{CE}(e^{\tau} \hat y_i, y_i)` with a learned log-temperature :math:`\tau`.

    ``target_labels``: class indices ``(m,)``. (The official code also subtracts a label-margin term that its
    authors describe as likely inert; it is left out.)
    """
    return F.cross_entropy(predictions * torch.exp(log_temperature.to(predictions.dtype)), target_labels)


def clip_implicit_gradients(implicit: list[Tensor | None], direct: list[Tensor | None]) -> list[Tensor | None]:
    r"""RCIG's clipping: each implicit-gradient tensor rescaled to at most the norm of its direct gradient.

    :math:`g^{imp} \leftarrow g^{imp}\, \min(\|g^{dir}\|, \|g^{imp}\|) / \|g^{imp}\|` per parameter
    tensor (images, labels, temperature), zero where :math:`g^{imp} = 0`, as ``do_meta_train_step`` of
    yolky/RCIG ("helps stability ... the implicit gradient could grow very very large").
    """
    if len(implicit) != len(direct):
        raise ValueError(f"implicit and direct must list the same tensors, got {len(implicit)} and {len(direct)}")
    clipped: list[Tensor | None] = []
    for g_imp, g_dir in zip(implicit, direct):
        if g_imp is None:
            clipped.append(None)
            continue
        norm_imp = g_imp.norm()
        norm_dir = torch.zeros_like(norm_imp) if g_dir is None else g_dir.norm().to(norm_imp.dtype)
        scale = torch.where(norm_imp > 0, torch.minimum(norm_imp, norm_dir) / norm_imp.clamp_min(1e-300),
                            torch.zeros_like(norm_imp))
        clipped.append(g_imp * scale)
    return clipped


class ImplicitBilevelObjective(Objective):
    r"""RCIG-style implicit differentiation around a convex inner optimum (Loo et al. 2023, simplified).

    Each step: a fresh random ``arch`` network from the sampler gives frozen features
    :math:`\phi(x) = [\mathrm{embed}(x)/\sqrt d, 1]` (its last layer linearised: a linear model on the
    features is exactly the network's linearisation in the last layer); the inner problem is the
    convex :func:`inner_linear_loss` (``rcig_l2``) of :math:`W` on the synthetic features, solved by
    L-BFGS (``rcig_inner_steps``); the outer loss is :math:`\mathrm{CE}(\phi(X_T) W^*, y_T)` on a
    class-balanced real batch; its gradient with respect to S is :func:`implicit_hypergradient` with
    ``rcig_solver`` ``"cg"`` or ``"neumann"`` (``rcig_hinv_steps`` Hessian-vector products).

    **Relation to an IPM**: none: a bilevel performance objective.
    Cost: feature passes on S and T, the inner solve (on :math:`d \times C` numbers), the
    inverse-Hessian-vector product and one backward pass through the features of S.
    """

    name = "rcig"
    relation_to_ipm = "not an IPM: bilevel objective with a convex inner problem, implicit gradient"
    default_sampler = "fresh"

    @dataclass(frozen=True)
    class Options:
        rcig_solver: str = option("cg", "RCIG: conjugate gradients for the inverse-Hessian-vector product")
        rcig_l2: float = option(1e-3, "ridge of the inner problem (library choice; digits budgets tune it)")
        rcig_inner_steps: int = option(100, "L-BFGS iterations of the inner solve")
        rcig_hinv_steps: int = option(20, "RCIG: 20 Hessian-vector products")

    @classmethod
    def prepare_config(cls, config, dataset):
        check_choice(config["rcig_solver"], ("cg", "neumann"), "rcig_solver")
        check_options(config, ("rcig_l2",), integers=("rcig_inner_steps", "rcig_hinv_steps"))
        return config

    @staticmethod
    def _features(net: nn.Module, images: Tensor) -> Tensor:
        emb = net.embed(images)
        emb = emb.reshape(emb.shape[0], -1) / math.sqrt(emb[0].numel())
        return torch.cat([emb, torch.ones_like(emb[:, :1])], dim=1).double()

    def loss_and_gradients(self, networks, params):
        if not networks:
            raise ValueError("objective 'rcig' needs a sampler that draws networks (e.g. 'fresh')")
        ctx, cfg = self.ctx, self.config
        net = networks[0]
        real, real_labels = ctx.real_batches.sample(int(cfg["batch_real"]))
        syn_feats = self._features(net, ctx.synthetic.images())
        with torch.no_grad():
            real_feats = self._features(net, real)
        labels = ctx.synthetic.labels
        l2 = float(cfg["rcig_l2"])
        w_star = solve_inner_linear(syn_feats, labels, l2, "ce", int(cfg["rcig_inner_steps"]))
        outer, grads = implicit_hypergradient(
            lambda w: inner_linear_loss(w, syn_feats, labels, l2, "ce"),
            lambda w: F.cross_entropy(real_feats @ w, real_labels),
            w_star, list(params), solver=cfg["rcig_solver"], iterations=int(cfg["rcig_hinv_steps"]),
        )
        grads = [None if g is None else g.to(p.dtype) for g, p in zip(grads, params)]
        return outer.float(), grads
