r"""Bilevel objectives: DD (unrolled back-propagation through training) and RCIG (implicit differentiation).

Both minimise the real-data loss of a model fitted on S. DD differentiates through ``dd_steps``
unrolled SGD steps (:func:`ipmcondense.autodiff.unrolled_sgd`); RCIG solves an inner problem in the tangent
offset of a linearised network and takes the implicit hypergradient (:func:`ipmcondense.autodiff.implicit_hypergradient`).

The ``rcig`` row (:class:`ImplicitBilevelObjective`) is the published RCIG step (Loo et al. ICML'23,
yolky/RCIG), built from pieces tested on their own: the linearisation of :func:`linearised_forward` (the pool network
linearised around its online-trained weights; the objective linearises its features and logits together), :func:`krr_head_predictions` (the last layer as closed-form kernel ridge
regression on the features), :func:`rcig_inner_loss` (the inner self-fit on S), :func:`rcig_krr_loss`
(cross-entropy with a learned temperature) and :func:`clip_implicit_gradients` (the implicit gradient's norm
clipped to the direct gradient's). :func:`inner_linear_loss` and :func:`solve_inner_linear` are a convex
last-layer problem on fixed features, kept for checking :func:`~ipmcondense.autodiff.implicit_hypergradient`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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

from ..synthetic import SyntheticExtras
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
    "rcig_inner_loss",
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
        from ..parallel import WholeSetOnEveryRank

        # class-parallel: the unroll trains on the whole S on every rank, the loss is this rank's real rows' share
        whole = WholeSetOnEveryRank.of_context(ctx)
        n_real = int(self.config["batch_real"])
        real, real_labels = ctx.real_batches.sample(n_real)
        value = unrolled_task_loss(
            self.template, start, whole.rows(ctx.synthetic.images()), ctx.synthetic.labels,
            whole.shared(self.raw_lrs), real, real_labels, step_batches=self.step_batches,
        )
        return whole.share(value, real.shape[0], n_real)

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


def clip_implicit_gradients(implicit: list[Tensor | None], direct: list[Tensor | None],
                            norm: Callable[[int, Tensor], Tensor] | None = None) -> list[Tensor | None]:
    r"""RCIG's clipping: each implicit-gradient tensor rescaled to at most the norm of its direct gradient.

    :math:`g^{imp} \leftarrow g^{imp}\, \min(\|g^{dir}\|, \|g^{imp}\|) / \|g^{imp}\|` per parameter
    tensor (images, labels, temperature), zero where :math:`g^{imp} = 0`, as ``do_meta_train_step`` of
    yolky/RCIG ("helps stability ... the implicit gradient could grow very very large"). ``norm(i, g)``: the
    norm of the ``i``-th tensor's gradient ``g`` (default its Euclidean norm; class-parallel: the norm of the
    whole gradient, of which a rank holds its own rows).
    """
    if len(implicit) != len(direct):
        raise ValueError(f"implicit and direct must list the same tensors, got {len(implicit)} and {len(direct)}")
    norm_of = norm if norm is not None else (lambda i, g: g.norm())
    clipped: list[Tensor | None] = []
    for i, (g_imp, g_dir) in enumerate(zip(implicit, direct)):
        if g_imp is None:
            clipped.append(None)
            continue
        norm_imp = norm_of(i, g_imp)
        norm_dir = torch.zeros_like(norm_imp) if g_dir is None else norm_of(i, g_dir).to(norm_imp.dtype)
        scale = torch.where(norm_imp > 0, torch.minimum(norm_imp, norm_dir) / norm_imp.clamp_min(1e-300),
                            torch.zeros_like(norm_imp))
        clipped.append(g_imp * scale)
    return clipped


class _FeaturesAndLogits(nn.Module):
    """``x -> (embed(x) flattened, classifier(embed(x)))`` of a wrapped network (for one functional call)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.net.embed(x)
        return emb.reshape(emb.shape[0], -1), self.net.classifier(emb)


def rcig_inner_loss(features: Tensor, outputs: Tensor, labels: Tensor, tangent: Tensor, l2: float) -> Tensor:
    r"""RCIG's inner (training) loss: the self-fit of the closed-form KRR last layer on S, with weight decay.

    With :math:`K = \Phi_S \Phi_S^\top` (``features`` ``(n, d)``), outputs :math:`f_S` ``(n, C)``, labels
    :math:`Y_S` and :math:`w = (K + l_2 I)^{-1}(Y_S - f_S)`:

    .. math:: L_{in} = \frac{1}{nC}\Big[\tfrac12 \|Y_S - f_S - K w\|^2
              + \tfrac{l_2}{2}\big(\mathrm{tr}(w^\top K w) + \|\delta\|^2\big)\Big]

    (``get_krr_loss_gd(self_loss=True)`` of yolky/RCIG), :math:`\delta` the ``tangent`` offset. Solved in
    float64. Cost: :math:`O(n^2 d + n^3)`.
    """
    fs = features.double()
    k = fs @ fs.T
    n, c = labels.shape
    residual = labels.double() - outputs.double()
    w = torch.linalg.solve(k + float(l2) * torch.eye(n, dtype=k.dtype, device=k.device), residual)
    error = residual - k @ w
    value = 0.5 * (error * error).sum() + 0.5 * float(l2) * ((w * (k @ w)).sum() + (tangent.double() ** 2).sum())
    return value / (n * c)


class ImplicitBilevelObjective(Objective):
    r"""RCIG: dataset distillation by implicit gradients of a linearised network with a KRR last layer (Loo et al. ICML'23).

    **Pool.** ``rcig_pool_models`` networks of ``arch`` (drawn from the run's generator). Each image step
    picks one at random. Its weights :math:`\theta_0` are the base point of the linearisation
    :math:`f_{lin}(x) = f(x;\theta_0) + J f(x;\theta_0)\,\delta` (:func:`linearised_forward`), features and
    outputs both linearised. After the step's gradient the chosen model is trained *online on S*: a random
    number in ``1..rcig_online_max_steps`` of Adam steps (step ``rcig_online_lr``) on
    :math:`\frac{1}{2nC}\|f(X_S;\theta) - Y_S\|^2`; a model with ``rcig_reset_interval`` online steps is
    re-initialised.

    **Inner problem.** The tangent offset :math:`\delta` (all parameters but the classifier's weight, whose
    role is taken by the closed-form last layer) starts at 0 and takes ``rcig_inner_steps`` Adam steps
    (step ``rcig_inner_lr``) on :func:`rcig_inner_loss` (ridge ``rcig_l2``).

    **Outer loss.** On a class-balanced real batch T: :func:`rcig_krr_loss` of the KRR predictions
    :func:`krr_head_predictions` (fitted on S's linearised features with the learned labels :math:`Y_S`)
    with a learned log-temperature :math:`\tau` (init 0, own step ``rcig_lr_temperature``).

    **Gradient** with respect to the images, the learned labels (init centred one-hot, stepped at the
    image rate ``lr_images``) and :math:`\tau`: the direct gradient at :math:`\delta^*` plus the implicit
    gradient :func:`implicit_hypergradient` (``rcig_solver`` ``"cg"`` or ``"neumann"``,
    ``rcig_hinv_steps`` Hessian-vector products in :math:`\delta`), the implicit part clipped per tensor to
    the direct part's norm (:func:`clip_implicit_gradients`).

    **Relation to an IPM**: none: a bilevel performance objective.
    Cost per step: ``rcig_inner_steps + rcig_hinv_steps + 3`` linearised passes (forward-mode JVPs) with
    their backward passes over S, one over T, an :math:`O(|S|^3)` solve per pass, and up to
    ``rcig_online_max_steps`` training steps of the pool model; memory ``3 * rcig_pool_models`` parameter
    vectors (weights and Adam moments).
    """

    name = "rcig"
    relation_to_ipm = "not an IPM: bilevel objective with a convex inner problem, implicit gradient"
    default_sampler = "none"

    @dataclass(frozen=True)
    class Options:
        rcig_solver: str = option("cg", "RCIG: conjugate gradients for the inverse-Hessian-vector product")
        rcig_l2: float = option(1e-3, "ridge of the KRR last layer and the tangent (the rcig row sets RCIG's 5e-4)")
        rcig_inner_steps: int = option(100, "inner Adam steps on the tangent (the rcig row sets RCIG's 20)")
        rcig_hinv_steps: int = option(20, "RCIG: n_hinv_steps 20 Hessian-vector products")
        rcig_pool_models: int = option(30, "RCIG configs_final/depth_3.txt: pool_model_count 30")
        rcig_online_max_steps: int = option(15, "RCIG: randint(1, n_max_steps_pool=16) online steps per visit")
        rcig_online_lr: float = option(5e-5, "RCIG configs_final/depth_3.txt: pool_learning_rate 5e-5 (Adam)")
        rcig_reset_interval: int = option(100, "RCIG configs_final/depth_3.txt: max_online_steps 100")
        rcig_inner_lr: float = option(1e-4, "RCIG algorithms.py: inner Adam(1e-4) on the tangent")
        rcig_lr_temperature: float = option(0.03, "RCIG algorithms.py: log_temp optimiser step 0.03")

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.template = build_isolated(ctx.build_network).to(ctx.device).eval()
        if not hasattr(self.template, "embed") or not isinstance(getattr(self.template, "classifier", None), nn.Linear):
            raise ValueError(f"objective 'rcig' needs an arch with embed() and a linear classifier, got {ctx.config['arch']!r}")
        self.wrapper = _FeaturesAndLogits(self.template)
        self.layout = FlatParameters(self.template)
        mask = torch.cat([torch.full((numel,), name != "classifier.weight", dtype=torch.bool)
                          for name, numel in zip(self.layout.names, self.layout.numels)])
        self.tangent_index = mask.nonzero().squeeze(1).to(ctx.device)
        self.log_temperature = nn.Parameter(torch.zeros((), dtype=torch.float64, device=ctx.device))
        count = int(ctx.config["rcig_pool_models"])
        self.pool_params = torch.stack([self._fresh_parameters() for _ in range(count)])
        self.pool_exp_avg = torch.zeros_like(self.pool_params)
        self.pool_exp_avg_sq = torch.zeros_like(self.pool_params)
        self.pool_steps = torch.zeros(count, dtype=torch.long)
        #: the pool model the last step used (for tests and logging)
        self.last_model_index: int | None = None

    @classmethod
    def prepare_config(cls, config, dataset):
        check_choice(config["rcig_solver"], ("cg", "neumann"), "rcig_solver")
        check_options(config, ("rcig_l2", "rcig_online_lr", "rcig_inner_lr", "rcig_lr_temperature"),
                      integers=("rcig_inner_steps", "rcig_hinv_steps", "rcig_pool_models", "rcig_online_max_steps",
                                "rcig_reset_interval"))
        return config

    @classmethod
    def synthetic_extras(cls, images, labels, dataset, config):
        from ipmcondense.ipm.kernel_regression import centred_one_hot

        return SyntheticExtras(label_values=centred_one_hot(labels, dataset.num_classes),
                               lr_labels=float(config["lr_images"]))

    def parameter_groups(self):
        return [{"params": [self.log_temperature], "lr": float(self.config["rcig_lr_temperature"])}]

    # ---------------------------------------------------------------------------- the network
    def _fresh_parameters(self) -> Tensor:
        return flatten_parameters(draw_network(self.ctx)).detach()

    def _tangent_vector(self, tangent: Tensor) -> Tensor:
        full = torch.zeros(self.layout.numel, dtype=tangent.dtype, device=tangent.device)
        return full.index_add(0, self.tangent_index, tangent)

    def linearised_features_and_outputs(self, base: Tensor, tangent: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Features and logits of the pool network linearised around ``base`` at the tangent offset ``tangent``
        (the free coordinates: all but the classifier's weight): value + JVP, differentiable in ``x`` and ``tangent``."""
        names = ["net." + n for n in self.layout.names]

        def call(flat: Tensor) -> tuple[Tensor, Tensor]:
            views = self.layout.views(flat)
            return torch.func.functional_call(self.wrapper, dict(zip(names, views.values())), (x,))

        (feat, out), (d_feat, d_out) = torch.func.jvp(call, (base,), (self._tangent_vector(tangent),))
        return feat + d_feat, out + d_out

    # ---------------------------------------------------------------------------- one step
    def _support_labels(self) -> Tensor:
        return self.ctx.synthetic.label_values

    def loss_and_gradients(self, networks, params):
        ctx, cfg = self.ctx, self.config
        params = list(params)
        l2 = float(cfg["rcig_l2"])
        index = int(torch.randint(0, self.pool_params.shape[0], (1,), generator=ctx.generator))
        self.last_model_index = index
        base = self.pool_params[index]
        from ..parallel import WholeSetOnEveryRank

        # class-parallel: the inner problem and the pool's training run on the whole S on every rank (``*_inner``:
        # differentiated as a whole, replicated); the outer loss is this rank's real rows' share, its gradients in
        # S, the labels, the temperature and the tangent summed over the ranks
        whole = WholeSetOnEveryRank.of_context(ctx)
        n_real = int(cfg["batch_real"])
        real, real_labels = ctx.real_batches.sample(n_real)
        images_inner = whole.rows(ctx.synthetic.images(), summed=False)
        labels_inner = whole.rows(self._support_labels(), summed=False)
        images, labels = whole.shared(images_inner), whole.shared(labels_inner)

        def inner(tangent: Tensor, x: Tensor, y: Tensor) -> Tensor:
            feat, out = self.linearised_features_and_outputs(base, tangent, x)
            return rcig_inner_loss(feat, out, y, tangent, l2)

        # inner problem: Adam on the tangent offset, from 0
        tangent = torch.zeros(self.tangent_index.numel(), dtype=base.dtype, device=base.device, requires_grad=True)
        optimiser = torch.optim.Adam([tangent], lr=float(cfg["rcig_inner_lr"]))
        x_fixed, y_fixed = images.detach(), labels.detach()
        with torch.enable_grad():
            for _ in range(int(cfg["rcig_inner_steps"])):
                optimiser.zero_grad()
                inner(tangent, x_fixed, y_fixed).backward()
                optimiser.step()
        solution = tangent.detach()

        with torch.no_grad():
            feat_t, out_t = self.linearised_features_and_outputs(base, solution, real)

        def outer(tangent: Tensor) -> Tensor:
            feat_s, out_s = self.linearised_features_and_outputs(base, tangent, images)
            predictions = krr_head_predictions(feat_s, out_s, labels, feat_t, out_t, l2)
            value = rcig_krr_loss(predictions, real_labels, whole.shared(self.log_temperature))
            return whole.share(value, real.shape[0], n_real)

        # the target side depends on the tangent too: the outer loss's gradient in delta includes it
        def outer_in_tangent(tangent: Tensor) -> Tensor:
            tangent = whole.shared(tangent)
            feat_s, out_s = self.linearised_features_and_outputs(base, tangent, images.detach())
            feat_tt, out_tt = self.linearised_features_and_outputs(base, tangent, real)
            predictions = krr_head_predictions(feat_s, out_s, labels.detach(), feat_tt, out_tt, l2)
            value = rcig_krr_loss(predictions, real_labels, self.log_temperature.detach())
            return whole.share(value, real.shape[0], n_real)

        with torch.enable_grad():
            value = outer(solution)
            direct = list(torch.autograd.grad(value, params, allow_unused=True, retain_graph=True))
            alpha = None
            if cfg["rcig_solver"] == "neumann":  # the inner loss need not be convex in the tangent: step 1/|lambda|max
                alpha = 1.0 / max(abs(self._largest_eigenvalue(lambda t: inner(t, x_fixed, y_fixed), solution)), 1e-12)
            _, implicit = implicit_hypergradient(
                lambda t: inner(t, images_inner, labels_inner), outer_in_tangent, solution, params,
                solver=cfg["rcig_solver"], iterations=int(cfg["rcig_hinv_steps"]), alpha=alpha,
            )
        row_ids = {id(p) for p in ctx.synthetic.image_parameters()} | {id(ctx.synthetic.label_values)}
        implicit = clip_implicit_gradients(implicit, direct,
                                           norm=lambda i, g: whole.norm(g, rows=id(params[i]) in row_ids))
        grads = []
        for p, g_dir, g_imp in zip(params, direct, implicit):
            if g_dir is None and g_imp is None:
                grads.append(None)
            else:
                total = (torch.zeros_like(p, dtype=torch.float64) if g_dir is None else g_dir.double()) + (
                    0.0 if g_imp is None else g_imp.double())
                grads.append(total.to(p.dtype))
        self.train_pool_model(index, images.detach(), labels.detach())
        return value.detach().float(), grads

    @staticmethod
    def _largest_eigenvalue(loss, at: Tensor, iterations: int = 20) -> float:
        """Power iteration (fixed start) on the Hessian of ``loss`` at ``at``: the eigenvalue of largest modulus."""
        point = at.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(point), point, create_graph=True)
        v = torch.ones_like(point) / math.sqrt(point.numel())
        value = 0.0
        for _ in range(iterations):
            (hv,) = torch.autograd.grad(gradient, point, grad_outputs=v, retain_graph=True)
            value = float((v * hv).sum())
            norm = float(hv.norm())
            if not math.isfinite(norm) or norm == 0.0:
                break
            v = hv / norm
        return value

    def train_pool_model(self, index: int, images: Tensor, labels: Tensor) -> int:
        r"""RCIG's online training of pool model ``index`` on S: ``k ~ U{1..rcig_online_max_steps}`` Adam steps
        (step ``rcig_online_lr``, betas (0.9, 0.999), eps 1e-8, the model's own moments) on
        :math:`\frac{1}{2nC}\|f(X_S) - Y_S\|^2`; re-initialised once it has taken ``rcig_reset_interval``
        online steps. Returns ``k``."""
        cfg = self.config
        steps = int(torch.randint(1, int(cfg["rcig_online_max_steps"]) + 1, (1,), generator=self.ctx.generator))
        lr, beta1, beta2, eps = float(cfg["rcig_online_lr"]), 0.9, 0.999, 1e-8
        theta = self.pool_params[index].clone()
        m, v = self.pool_exp_avg[index].clone(), self.pool_exp_avg_sq[index].clone()
        t = int(self.pool_steps[index])
        n, c = labels.shape
        for _ in range(steps):
            with torch.enable_grad():
                p = theta.detach().requires_grad_(True)
                out = functional_forward(self.template, p, images)
                loss = 0.5 * ((out - labels) ** 2).sum() / (n * c)
                (g,) = torch.autograd.grad(loss, p)
            t += 1
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
            theta = theta - lr * m_hat / (v_hat.sqrt() + eps)
        if t >= int(cfg["rcig_reset_interval"]):
            theta, m, v, t = self._fresh_parameters(), torch.zeros_like(m), torch.zeros_like(v), 0
        self.pool_params[index], self.pool_exp_avg[index], self.pool_exp_avg_sq[index] = theta, m, v
        self.pool_steps[index] = t
        return steps

    def check_after_step(self, iteration):
        if not bool(torch.isfinite(self.log_temperature.detach())):
            raise FloatingPointError(f"the learned temperature of 'rcig' became non-finite at iteration {iteration}")

    def state_dict(self):
        return {"log_temperature": self.log_temperature.detach().cpu().clone(),
                "pool_params": self.pool_params.cpu().clone(), "pool_exp_avg": self.pool_exp_avg.cpu().clone(),
                "pool_exp_avg_sq": self.pool_exp_avg_sq.cpu().clone(), "pool_steps": self.pool_steps.clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])
        device = self.ctx.device
        self.pool_params = state["pool_params"].to(device).clone()
        self.pool_exp_avg = state["pool_exp_avg"].to(device).clone()
        self.pool_exp_avg_sq = state["pool_exp_avg_sq"].to(device).clone()
        self.pool_steps = state["pool_steps"].clone()
