r"""The method registry: every condensation method is one row of one table.

A recipe chooses one value on each of the three axes of the outer loss

.. math:: L(S) = E_{\theta \sim \text{sampler}} \sum_c D\big(\phi_\theta(A(S_c)), \phi_\theta(A(T_c))\big)

(feature map :math:`\phi`, discrepancy :math:`D`, parameter sampler), plus the augmentation ``A``
(``"dsa"``: differentiable siamese augmentation; ``"none"``), the parameterisation of S, optional
extra (non-IPM) terms, its relation to an IPM, and its reference hyperparameters. Selection
baselines (random, herding, k-center) are rows too: they go through the same pipeline and write
the same outputs.

Hyperparameters are resolved as ``COMMON_DEFAULTS | DATASET_DEFAULTS[dataset] | recipe.defaults
| DATASET_BUDGETS[dataset][recipe] | DATASET_IPC_BUDGETS[dataset][recipe][ipc] | user overrides``
(:func:`resolve_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ipmcondense.features import FEATURE_MAP_NAMES
from ipmcondense.ipm._validation import check_choice

from .discrepancies import DISCREPANCY_NAMES, EXTRA_TERM_NAMES, get_discrepancy
from .objectives import OBJECTIVE_NAMES
from .samplers import SAMPLER_NAMES

__all__ = [
    "Recipe",
    "RECIPES",
    "METHOD_NAMES",
    "COMMON_DEFAULTS",
    "DATASET_BUDGETS",
    "DATASET_IPC_BUDGETS",
    "DATASET_DEFAULTS",
    "HYPERPARAMETER_KEYS",
    "get_recipe",
    "compose_recipe",
    "resolve_config",
    "EXACT",
    "NORMALISED",
    "APPROXIMATE",
    "FIRST_ORDER",
    "NOT_AN_IPM",
]

EXACT = "exact IPM"
NORMALISED = "normalised variant"
APPROXIMATE = "approximation / not an IPM"
FIRST_ORDER = "first-order approximation"
NOT_AN_IPM = "not an IPM"


@dataclass(frozen=True)
class Recipe:
    """One condensation method as a choice on the three axes.

    Attributes:
        name: registry key (the paper's short name, lower case).
        feature_map: a :data:`ipmcondense.features.FEATURE_MAP_NAMES` entry (``"-"`` for selection).
        discrepancy: a :data:`DISCREPANCY_NAMES` entry (``"-"`` for selection).
        sampler: a :data:`SAMPLER_NAMES` entry (``"-"`` for selection).
        augmentation: ``"dsa"`` or ``"none"`` (siamese, inside the loss).
        relation_to_ipm: :data:`EXACT`, :data:`NORMALISED`, :data:`APPROXIMATE`, :data:`FIRST_ORDER` or :data:`NOT_AN_IPM`.
        why: one sentence justifying ``relation_to_ipm``.
        defaults: reference hyperparameters (override :data:`COMMON_DEFAULTS`).
        parameterisation: how S is stored (``"pixels"``).
        extra_terms: names of non-IPM terms added to the loss (weights in ``defaults``).
        selection: for baselines, the :mod:`ipmcondense.selection` strategy; ``None`` for optimised recipes.
        source: where the reference hyperparameters come from.
        objective: what one step minimises (:data:`ipmcondense.condensation.objectives.OBJECTIVE_NAMES`):
            ``"matching"`` (the three axes above) or a non-matching objective (``"mtt"``, ``"kip"``,
            ``"rfad"``, ``"dd"``, ``"rcig"``), whose unused axes are ``"-"``.
    """

    name: str
    feature_map: str
    discrepancy: str
    sampler: str
    augmentation: str
    relation_to_ipm: str
    why: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    parameterisation: str = "pixels"
    extra_terms: tuple[str, ...] = ()
    selection: str | None = None
    source: str = ""
    objective: str = "matching"

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        self.validate()

    @property
    def is_selection(self) -> bool:
        return self.selection is not None

    def validate(self) -> None:
        """Check the axes are known and compatible; raise ``ValueError`` naming the bad one."""
        check_choice(self.augmentation, ("dsa", "none"), "augmentation")
        check_choice(self.relation_to_ipm, (EXACT, NORMALISED, APPROXIMATE, FIRST_ORDER, NOT_AN_IPM), "relation_to_ipm")
        if self.is_selection:
            return
        check_choice(self.objective, OBJECTIVE_NAMES, "objective")
        if self.objective != "matching":
            check_choice(self.sampler, (*SAMPLER_NAMES, "-"), "sampler")
            return
        if self.sampler == "none":
            raise ValueError("the matching objective needs networks: sampler 'none' draws none")
        check_choice(self.feature_map, FEATURE_MAP_NAMES, "feature map")
        check_choice(self.discrepancy, DISCREPANCY_NAMES, "discrepancy")
        check_choice(self.sampler, SAMPLER_NAMES, "sampler")
        for term in self.extra_terms:
            check_choice(term, EXTRA_TERM_NAMES, "extra term")
        if get_discrepancy(self.discrepancy).needs_gradient_features and self.feature_map != "gradients":
            raise ValueError(
                f"discrepancy {self.discrepancy!r} compares parameter gradients: it needs feature map "
                f"'gradients', got {self.feature_map!r}"
            )

    def axes(self) -> dict[str, Any]:
        """The row as a plain dict (for ``ipmcondense methods --json`` and saved configs)."""
        return {
            "name": self.name,
            "feature_map": self.feature_map,
            "discrepancy": self.discrepancy,
            "sampler": self.sampler,
            "augmentation": self.augmentation,
            "objective": self.objective,
            "parameterisation": self.parameterisation,
            "extra_terms": list(self.extra_terms),
            "selection": self.selection,
            "relation_to_ipm": self.relation_to_ipm,
            "why": self.why,
            "defaults": dict(self.defaults),
            "source": self.source,
        }


# Hyperparameters every recipe has (reference values of VICO-UoE DC/DSA/DM, methods.md §1-2.4).
COMMON_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "arch": "convnet",           # the network of the feature map and of the evaluation
    "iterations": 1000,          # outer iterations (fresh_inner: each takes outer_loop image steps)
    "lr_images": 0.1,            # SGD on S
    "momentum_images": 0.5,
    "batch_real": 256,           # real images per class per step
    "init": "real",              # real | noise | random | herding | kcenter | kmeans
    "lr_decay_at": (),           # fractions of `iterations` where lr_images is multiplied by lr_decay
    "lr_decay": 0.5,
    "class_batching": True,      # one forward pass for all classes where the recipe allows
    "checkpoint_every": 0,       # 0: 20 checkpoints per run (and always the last iteration)
    "eval_every": 0,             # 0: no evaluation during condensation
    "eval_models": 1,
    "eval_epochs": None,         # None: protocol default (1000 with DSA)
    # feature-map options
    "layer_weights": None, "embedding_weight": 1.0, "attention_weight": 100.0,
    "attention_power": 1.0, "gradient_mode": "mean",
    # discrepancy options
    "bandwidth": "median", "estimator": "biased", "blur": 0.05, "n_projections": 200,
    # sampler options
    "outer_loop": None, "inner_loop": None, "lr_net": 0.01, "batch_train": 256,
    "pool_size": 100, "generate_interval": 5, "fetch": 2, "train_steps": 10, "lr_pool": 0.01, "batch_pool": 26,
    # extra-term weights
    "ce_weight": 0.5, "inner_weight": 0.01,
    # optimiser of S: "sgd" (momentum_images) or "adam"
    "optimizer_images": "sgd",
    # LCMat curvature regulariser on gradient matching (0: off)
    "lcmat_weight": 0.0, "lcmat_rho": 0.05,
    # mtt: expert buffer, unroll, learnable lr (init lr_teacher; None: the buffer's lr), soft labels
    "experts": None, "syn_steps": 20, "expert_epochs": 2, "max_start_epoch": None, "batch_syn": None,
    "lr_teacher": None, "lr_lr": 1e-5, "memory_lean": False, "soft_labels": False, "lr_labels": 2.0,
    # kip / rfad: kernel ridge regression
    "kernel": "fc_ntk", "kernel_depth": 1, "krr_reg": 1e-6, "learn_labels": False, "n_models": 8,
    "rf_width": 256, "lr_temperature": 0.01,
    # dd: unrolled bilevel
    "dd_steps": 10, "dd_lr_init": 0.02, "lr_lrs": 0.01, "dd_init": "fresh",
    # rcig: implicit bilevel
    "rcig_solver": "cg", "rcig_l2": 1e-3, "rcig_inner_steps": 100, "rcig_hinv_steps": 20,
})

HYPERPARAMETER_KEYS = tuple(COMMON_DEFAULTS)

_DM = {"iterations": 20000, "lr_images": 1.0, "batch_real": 256, "init": "real"}
_DC = {"iterations": 1000, "lr_images": 0.1, "batch_real": 256, "init": "noise", "lr_net": 0.01}

#  name          feature map    discrepancy        sampler         aug     relation to an IPM
_ROWS = (
    Recipe("dm",          "embedding",  "mean_embedding",  "fresh",       "dsa",  EXACT,
           "squared linear-kernel IPM per random network; averaged over networks an MMD^2 with the "
           "random-feature kernel E<phi(x), phi(x')>.", _DM, source="Zhao & Bilen WACV'23, main_DM.py"),
    Recipe("m3d",         "embedding",  "mmd",             "fresh",       "dsa",  EXACT,
           "Gaussian-kernel MMD^2 of random-network embeddings (characteristic kernel).", _DM,
           source="Zhang et al. AAAI'24 (no code: DM defaults)"),
    Recipe("wasserstein", "embedding",  "sinkhorn",        "fresh",       "dsa",  APPROXIMATE,
           "debiased Sinkhorn divergence: approximates W_p (the 1-Lipschitz IPM for p=1); use "
           "discrepancy='sliced' for sliced Wasserstein.", _DM, source="WMDD-style; DM defaults"),
    Recipe("dc",          "gradients",  "gradient_cosine", "fresh_inner", "none", NORMALISED,
           "row-wise cosine between class-mean loss gradients: the gradient-ball IPM normalised by "
           "gradient norms (gradient_mse gives the exact IPM^2).", _DC, source="Zhao et al. ICLR'21, main.py"),
    Recipe("dsa",         "gradients",  "gradient_cosine", "fresh_inner", "dsa",  NORMALISED,
           "DC with the siamese augmentation inside the loss.", {**_DC, "init": "real"},
           source="Zhao & Bilen ICML'21, main.py --method DSA"),
    Recipe("cafe",        "layers",     "mean_embedding",  "fresh_inner", "dsa",  APPROXIMATE,
           "a weighted sum of per-layer linear-kernel IPM^2 plus a discriminative cross-entropy "
           "term that is not an IPM.",
           {**_DC, "iterations": 2000, "layer_weights": (0.1, 0.1, 1.0), "embedding_weight": 1.0,
            "inner_weight": 0.01, "lr_decay_at": (0.6, 0.8, 0.9)},
           extra_terms=("prototype_discrimination",), source="Wang et al. CVPR'22, distill.py (fixed loops)"),
    Recipe("datadam",     "attention",  "mean_embedding",  "fresh",       "dsa",  EXACT,
           "sum of linear-kernel IPM^2 on attention maps (x100) and on the embedding (x100*0.01).",
           {**_DM, "batch_real": 64, "attention_weight": 100.0, "embedding_weight": 1.0},
           source="Sajedi et al. ICCV'23, main_DataDAM.py"),
    Recipe("lcmat",       "gradients",  "gradient_cosine", "fresh_inner", "dsa",  APPROXIMATE,
           "gradient-matching IPM (DSA, normalised) plus the loss-curvature regulariser "
           "lcmat_weight*(GM(theta + rho g/|g|) - GM(theta)) (worst case over a rho-ball, one ascent step): "
           "not an IPM as a whole.", {**_DC, "init": "real", "lcmat_weight": 0.5, "lcmat_rho": 0.05},
           source="Shin et al. AISTATS'23 (LCMat-C code unreleased: DSA defaults)"),
    Recipe("idm",         "embedding",  "mean_embedding",  "pool",        "dsa",  APPROXIMATE,
           "linear-kernel IPM^2 on partly trained networks plus an accuracy-weighted cross-entropy "
           "on S (not an IPM).", {**_DM, "lr_images": 0.2, "ce_weight": 0.5},
           extra_terms=("synthetic_ce",), source="Zhao et al. CVPR'23, IDM command.txt (pixels only)"),
    # non-matching objectives (ipmcondense.condensation.objectives): unused axes are "-"
    Recipe("mtt",         "-",          "-",               "-",           "dsa",  FIRST_ORDER,
           "first-order approximation: as the synthetic lr -> 0 the normalised parameter displacement "
           "after N steps is accumulated gradient matching along the expert trajectory.",
           {"iterations": 5000, "lr_images": 100.0, "init": "real", "syn_steps": 20, "expert_epochs": 2,
            "max_start_epoch": 20, "lr_lr": 1e-5},
           source="Cazenavette et al. CVPR'22, distill.py (DC-BENCH table)", objective="mtt"),
    Recipe("kip",         "-",          "-",               "-",           "none", NOT_AN_IPM,
           "not an IPM: KRR regression loss of the predictor fitted on S; its witness class is the "
           "RKHS of the (NTK) kernel, the MMD with that kernel is the IPM counterpart.",
           {"iterations": 1000, "lr_images": 0.04, "optimizer_images": "adam", "init": "real",
            "batch_real": 500, "kernel": "fc_ntk", "krr_reg": 1e-6},
           source="Nguyen et al. ICLR'21, KIP.ipynb (FC kernel)", objective="kip"),
    Recipe("rfad",        "-",          "-",               "-",           "none", NOT_AN_IPM,
           "not an IPM: Platt-scaled KRR loss with the random-feature NNGP kernel (the kernel whose MMD "
           "DM estimates).",
           {"iterations": 1000, "lr_images": 1e-3, "optimizer_images": "adam", "init": "real",
            "batch_real": 128, "kernel": "rf_nngp", "krr_reg": 5e-3, "n_models": 8, "rf_width": 256},
           source="Loo et al. NeurIPS'22, yolky/RFAD (Adam for AdaBelief)", objective="rfad"),
    Recipe("dd",          "-",          "-",               "fresh",       "none", NOT_AN_IPM,
           "not an IPM: bilevel performance objective (real-data loss after unrolled SGD on S with "
           "learned step sizes).",
           {"iterations": 1000, "lr_images": 0.01, "optimizer_images": "adam", "init": "real",
            "batch_real": 100, "dd_steps": 10, "dd_lr_init": 0.02},
           source="Wang et al. 2018, ssnl/dataset-distillation (unknown_init)", objective="dd"),
    Recipe("rcig",        "-",          "-",               "fresh",       "none", NOT_AN_IPM,
           "not an IPM: bilevel objective, convex last-layer inner problem, implicit gradient (CG or "
           "Neumann inverse-Hessian-vector products).",
           {"iterations": 1000, "lr_images": 0.003, "optimizer_images": "adam", "init": "real",
            "batch_real": 100, "rcig_l2": 1e-3},
           source="Loo et al. ICML'23, yolky/RCIG (simplified: random-feature last layer)", objective="rcig"),
    # selection baselines: the same pipeline and outputs, no optimisation
    Recipe("random",      "-", "-", "-", "none", APPROXIMATE,
           "uniform real images per class: unbiased but not optimised for any IPM.",
           {"iterations": 0}, selection="random", source="real-data baseline"),
    Recipe("herding",     "-", "-", "-", "none", APPROXIMATE,
           "greedy (kernel herding) minimisation of the mean-embedding IPM over real images.",
           {"iterations": 0}, selection="herding", source="Welling ICML'09; Chen et al. UAI'10"),
    Recipe("kcenter",     "-", "-", "-", "none", APPROXIMATE,
           "greedy minimax coverage in feature space: a covering radius, not an IPM.",
           {"iterations": 0}, selection="kcenter", source="Sener & Savarese ICLR'18"),
)

RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _ROWS})
METHOD_NAMES = tuple(RECIPES)

# Per-dataset settings and budgets: one TOML file per dataset, each value beside its source
# (configs/<dataset>.toml, read by dataset_config.py). Imported here, after COMMON_DEFAULTS and
# METHOD_NAMES, because the loader validates the files against them.
from .dataset_config import DATASET_BUDGETS, DATASET_DEFAULTS, DATASET_IPC_BUDGETS  # noqa: E402


def get_recipe(name: str) -> Recipe:
    """The registry row ``name``; unknown names raise ``ValueError`` listing :data:`METHOD_NAMES`."""
    check_choice(name, METHOD_NAMES, "method")
    return RECIPES[name]


def compose_recipe(
    method: str = "dm",
    *,
    feature_map: str | None = None,
    discrepancy: str | None = None,
    sampler: str | None = None,
    augmentation: str | None = None,
) -> Recipe:
    """A registry row with some axes replaced: free composition without new code.

    ``compose_recipe("dm", discrepancy="mmd")`` is M3D; ``compose_recipe("dc", discrepancy="mmd",
    sampler="fresh")`` is gradient matching with a Gaussian MMD on frozen random networks. The
    defaults stay those of ``method``. The composed row is named ``"<method>+<changes>"`` and its
    ``relation_to_ipm`` follows the new discrepancy.
    """
    base = get_recipe(method)
    changes = {
        k: v
        for k, v in (("feature_map", feature_map), ("discrepancy", discrepancy), ("sampler", sampler),
                     ("augmentation", augmentation))
        if v is not None and v != getattr(base, k)
    }
    if not changes:
        return base
    if base.is_selection:
        raise ValueError(f"method {method!r} is a selection baseline: its axes cannot be changed")
    if base.objective != "matching":
        raise ValueError(
            f"method {method!r} uses the {base.objective!r} objective, not feature matching: its feature map, "
            "discrepancy, sampler and augmentation cannot be changed (use --set for its hyperparameters)"
        )
    if "discrepancy" in changes:
        relation = get_discrepancy(changes["discrepancy"]).relation_to_ipm
        if base.extra_terms:
            relation = APPROXIMATE
        why = f"composed from {method!r} with discrepancy {changes['discrepancy']!r} ({relation})."
        changes.update(relation_to_ipm=relation, why=why)
    suffix = "+".join(f"{k}={v}" for k, v in changes.items() if k in ("feature_map", "discrepancy", "sampler", "augmentation"))
    return replace(base, name=f"{method}+{suffix}", **changes)


def resolve_config(
    recipe: Recipe, dataset: str, overrides: Mapping[str, Any] | None = None, *, ipc: int | None = None
) -> dict[str, Any]:
    """``COMMON_DEFAULTS | DATASET_DEFAULTS[dataset] | recipe.defaults | DATASET_BUDGETS[dataset][method]
    | DATASET_IPC_BUDGETS[dataset][method][ipc] | overrides``.

    ``None`` values in ``overrides`` mean "not given". Unknown keys raise ``ValueError`` listing the
    valid ones. The budget profile is looked up by the base method name (before any ``+`` composition);
    the per-IPC row applies only when ``ipc`` is given and listed.
    """
    config = dict(COMMON_DEFAULTS)
    config.update(DATASET_DEFAULTS.get(dataset, {}))
    config.update(recipe.defaults)
    base_name = recipe.name.split("+", 1)[0]
    config.update(DATASET_BUDGETS.get(dataset, {}).get(base_name, {}))
    if ipc is not None:
        config.update(DATASET_IPC_BUDGETS.get(dataset, {}).get(base_name, {}).get(int(ipc), {}))
    for key, value in (overrides or {}).items():
        if key not in COMMON_DEFAULTS:
            raise ValueError(
                f"unknown hyperparameter {key!r}; expected one of: {', '.join(sorted(COMMON_DEFAULTS))}"
            )
        if value is not None:
            config[key] = value
    return config
