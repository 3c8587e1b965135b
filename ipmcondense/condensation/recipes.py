r"""The method registry: every condensation method is one row of one table.

A row is one of three kinds (a tagged union):

* :class:`MatchingRecipe`: the outer loss
  :math:`L(S) = E_{\theta \sim \text{sampler}} \sum_c D\big(\phi_\theta(A(S_c)), \phi_\theta(A(T_c))\big)`
  with a feature map :math:`\phi`, a discrepancy :math:`D`, a parameter sampler, optional extra (non-IPM)
  terms and the siamese augmentation ``A`` (DM, M3D, DC, DSA, CAFE, DataDAM, IDM, LCMat, ...);
* :class:`ObjectiveRecipe`: a non-matching objective (trajectory matching, kernel ridge regression,
  bilevel) with the sampler it draws networks from (MTT, KIP, RFAD, DD, RCIG);
* :class:`SelectionRecipe`: a selection baseline (random, herding, k-center) through the same pipeline.

Every row also names its ``synthetic`` parameterisation (how S is stored and decoded) and its
``real_batches`` selector (how real images are drawn per step), its relation to an IPM with a one-sentence
reason, its reference hyperparameters and their source. Every axis is a registered component
(:mod:`ipmcondense.components`); :func:`compose_recipe` swaps any of them without new code.

Hyperparameters are resolved as ``COMMON_DEFAULTS | DATASET_DEFAULTS[dataset] | recipe.defaults
| DATASET_BUDGETS[dataset][recipe] | DATASET_IPC_BUDGETS[dataset][recipe][ipc] | user overrides``
(:func:`resolve_config`); :data:`COMMON_DEFAULTS` is derived from the components' options
(:mod:`ipmcondense.condensation.config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar

from ipmcondense.features import FEATURE_MAPS
from ipmcondense.ipm._validation import check_choice

from .config import COMMON_DEFAULTS, HYPERPARAMETER_KEYS
from .discrepancies import DISCREPANCIES, canonical_discrepancy_name
from .extra_terms import EXTRA_TERMS
from .objectives import OBJECTIVES
from .real_batches import REAL_BATCH_SELECTORS
from .samplers import SAMPLERS
from .synthetic import SYNTHETIC_SETS

__all__ = [
    "Recipe",
    "MatchingRecipe",
    "ObjectiveRecipe",
    "SelectionRecipe",
    "RECIPES",
    "METHOD_NAMES",
    "COMMON_DEFAULTS",
    "DATASET_BUDGETS",
    "DATASET_IPC_BUDGETS",
    "DATASET_DEFAULTS",
    "HYPERPARAMETER_KEYS",
    "AUGMENTATION_NAMES",
    "get_recipe",
    "register_recipe",
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
RELATIONS = (EXACT, NORMALISED, APPROXIMATE, FIRST_ORDER, NOT_AN_IPM)
AUGMENTATION_NAMES = ("dsa", "none")
SELECTION_NAMES = ("random", "herding", "kcenter")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What every row has (see the module docstring for the three kinds).

    Attributes:
        name: registry key (the paper's short name, lower case).
        relation_to_ipm: :data:`EXACT`, :data:`NORMALISED`, :data:`APPROXIMATE`, :data:`FIRST_ORDER` or :data:`NOT_AN_IPM`.
        why: one sentence justifying ``relation_to_ipm``.
        defaults: reference hyperparameters (override :data:`COMMON_DEFAULTS`).
        source: where the reference hyperparameters come from (and what the row was compared against).
        augmentation: ``"dsa"`` (siamese, inside the loss) or ``"none"``.
        synthetic: the synthetic-set parameterisation (:data:`~ipmcondense.condensation.synthetic.SYNTHETIC_NAMES`).
        real_batches: the real-batch selector (:data:`~ipmcondense.condensation.real_batches.REAL_BATCH_NAMES`),
            ``None`` where the row draws no real batches.
    """

    kind: ClassVar[str] = ""

    name: str
    relation_to_ipm: str
    why: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    augmentation: str = "none"
    synthetic: str = "pixels"
    real_batches: str | None = "random"

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        self.validate()

    @property
    def is_selection(self) -> bool:
        return False

    def validate(self) -> None:
        """Check the row's names; raise ``ValueError`` naming the bad axis."""
        check_choice(self.augmentation, AUGMENTATION_NAMES, "augmentation")
        check_choice(self.relation_to_ipm, RELATIONS, "relation_to_ipm")
        SYNTHETIC_SETS.get(self.synthetic)
        if self.real_batches is not None:
            REAL_BATCH_SELECTORS.get(self.real_batches)
        unknown = sorted(set(self.defaults) - set(HYPERPARAMETER_KEYS))
        if unknown:
            raise ValueError(f"recipe {self.name!r} has unknown hyperparameter default(s) {unknown}")

    def axes(self) -> dict[str, Any]:
        """The row as a plain dict (``ipmcondense methods --json`` and saved configs); ``None`` = not applicable."""
        return {
            "name": self.name,
            "kind": self.kind,
            "objective": getattr(self, "objective", None),
            "feature_map": getattr(self, "feature_map", None),
            "discrepancy": getattr(self, "discrepancy", None),
            "sampler": getattr(self, "sampler", None),
            "extra_terms": list(getattr(self, "extra_terms", ())),
            "selection": getattr(self, "selection", None),
            "augmentation": self.augmentation,
            "synthetic": self.synthetic,
            "real_batches": self.real_batches,
            "relation_to_ipm": self.relation_to_ipm,
            "why": self.why,
            "defaults": dict(self.defaults),
            "source": self.source,
        }


@dataclass(frozen=True, kw_only=True)
class MatchingRecipe(Recipe):
    """A feature-matching row: feature map x discrepancy x parameter sampler (+ extra terms)."""

    kind: ClassVar[str] = "matching"
    objective: ClassVar[str] = "matching"

    feature_map: str
    discrepancy: str
    sampler: str
    extra_terms: tuple[str, ...] = ()

    def validate(self) -> None:
        super().validate()
        FEATURE_MAPS.get(self.feature_map)
        discrepancy = DISCREPANCIES.get(self.discrepancy)
        SAMPLERS.get(self.sampler)
        if self.sampler == "none":
            raise ValueError("the matching objective needs networks: sampler 'none' draws none")
        for term in self.extra_terms:
            EXTRA_TERMS.get(term)
        if discrepancy.needs_gradient_features and self.feature_map != "gradients":
            raise ValueError(
                f"discrepancy {self.discrepancy!r} compares parameter gradients: it needs feature map "
                f"'gradients', got {self.feature_map!r}"
            )
        if self.real_batches is None:
            raise ValueError("a matching recipe draws real batches: real_batches cannot be None")


@dataclass(frozen=True, kw_only=True)
class ObjectiveRecipe(Recipe):
    """A row whose step minimises a non-matching objective (:data:`~ipmcondense.condensation.objectives.OBJECTIVE_NAMES`)."""

    kind: ClassVar[str] = "objective"

    objective: str
    sampler: str = "none"

    def validate(self) -> None:
        super().validate()
        cls = OBJECTIVES.get(self.objective)
        if self.objective == "matching":
            raise ValueError("use MatchingRecipe for the matching objective")
        SAMPLERS.get(self.sampler)
        if (self.real_batches is None) == cls.uses_real_batches:
            expected = "a selector name" if cls.uses_real_batches else "None (it draws no real batches)"
            raise ValueError(f"objective {self.objective!r} needs real_batches {expected}, got {self.real_batches!r}")


@dataclass(frozen=True, kw_only=True)
class SelectionRecipe(Recipe):
    """A selection baseline: real images picked by :mod:`ipmcondense.selection`, no optimisation."""

    kind: ClassVar[str] = "selection"

    selection: str
    real_batches: str | None = None

    @property
    def is_selection(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        check_choice(self.selection, SELECTION_NAMES, "selection")


_DM = {"iterations": 20000, "lr_images": 1.0, "batch_real": 256, "init": "real"}
_DC = {"iterations": 1000, "lr_images": 0.1, "batch_real": 256, "init": "noise", "lr_net": 0.01}

_ROWS = (
    # ------------------------------------------------------------------ feature matching
    #             name           feature map   discrepancy        sampler          aug
    MatchingRecipe(name="dm", feature_map="embedding", discrepancy="mean_embedding", sampler="fresh", augmentation="dsa",
                   relation_to_ipm=EXACT,
                   why="squared linear-kernel IPM per random network; averaged over networks an MMD^2 with the "
                       "random-feature kernel E<phi(x), phi(x')>.",
                   defaults=_DM, source="Zhao & Bilen WACV'23, main_DM.py"),
    MatchingRecipe(name="m3d", feature_map="embedding", discrepancy="mmd2", sampler="fresh", augmentation="dsa",
                   relation_to_ipm=EXACT,
                   why="Gaussian-kernel MMD^2 (biased V-statistic, median-heuristic bandwidth of the pooled class "
                       "batch, recomputed every step) of random-network embeddings; the kernel is characteristic on "
                       "the embedding, not on pixels, so it separates distributions only up to what the embedding sees.",
                   defaults=_DM, source="Zhang et al. AAAI'24 (no code released: DM defaults; pixels, not its "
                                        "factor & up-sampling; one image step per random model)"),
    MatchingRecipe(name="wasserstein", feature_map="embedding", discrepancy="sinkhorn", sampler="fresh",
                   augmentation="dsa", relation_to_ipm=APPROXIMATE,
                   why="debiased Sinkhorn divergence with cost |x - y| (sinkhorn_p=1): tends to W_1, the IPM over "
                       "1-Lipschitz witnesses, as blur -> 0, and to half the energy distance (an MMD) as blur -> "
                       "infinity; at a positive blur it is not itself an IPM. sinkhorn_p=2 gives W_2^2/2, not an IPM; "
                       "discrepancy='sliced' gives sliced Wasserstein.",
                   defaults={**_DM, "sinkhorn_p": 1},
                   source="W1 matching of random-network embeddings (the seed's Wasserstein method); DM defaults. "
                          "WMDD (Liu et al.) is a different algorithm (W2 barycentres of trained features), not this row"),
    MatchingRecipe(name="wmdd", feature_map="embedding", discrepancy="w2_barycenter", sampler="pretrained",
                   augmentation="dsa", extra_terms=("class_norm_statistics", "teacher_ce"), relation_to_ipm=APPROXIMATE,
                   why="per class sqrt(ipc) W_2 between the synthetic embeddings and the ipc-atom W_2 barycenter of the "
                       "real ones, in one trained network's feature space, plus per-class BatchNorm-statistics and "
                       "cross-entropy penalties: W_2 is not an IPM (W_1 <= W_2 only bounds the Lipschitz IPM).",
                   defaults={"iterations": 2000, "lr_images": 0.25, "optimizer_images": "adam", "init": "noise",
                             "batch_real": 256},
                   source="Liu et al. ICCV'25 (arXiv 2311.18531), Liu-Hy/WMDD recover/data_synthesis_new.py, "
                          "recover/barycenter.py, utils.py BNFeatureHook_new, run.sh: loss r_wb CE + ||f(x) - "
                          "bary|| + r_bn sum_l mean_c(||var|| + ||mean||), r_wb 1, r_bn 0.01, Adam lr 0.25, 2000 "
                          "iterations, noise init, teacher pretrained 50 epochs (SGD 0.025 cosine, wd 1e-4). "
                          "Deviations: ConvNet teacher trained pretrain_steps class-balanced SGD steps instead of a "
                          "ResNet-18; the barycenter of each step's (siamese-augmented) real batch of batch_real per "
                          "class, matched by optimal assignment, instead of once on all un-augmented class images "
                          "with atoms paired by index; real statistics from the batch, not the class's running "
                          "statistics; statistics at the input of the ConvNet's instance norm where there is no "
                          "BatchNorm; Adam betas (0.9, 0.999) not (0.5, 0.9), no cosine image-lr schedule, DSA "
                          "instead of random-resized-crop/flip/jitter; no FKD soft relabelling (the standard protocol "
                          "evaluates on hard labels)"),
    MatchingRecipe(name="dc", feature_map="gradients", discrepancy="gradient_cosine", sampler="fresh_inner",
                   augmentation="none", relation_to_ipm=NORMALISED,
                   why="per output row r of each layer, 1 - cos(a_r, b_r) = (IPM_r^2 - (|a_r| - |b_r|)^2) / "
                       "(2 |a_r| |b_r|) with IPM_r = |a_r - b_r| the gradient-ball IPM of the class-mean loss "
                       "gradients a_r, b_r: a normalised variant (gradient_mse gives the exact IPM^2).",
                   defaults=_DC, source="Zhao et al. ICLR'21, main.py"),
    MatchingRecipe(name="dsa", feature_map="gradients", discrepancy="gradient_cosine", sampler="fresh_inner",
                   augmentation="dsa", relation_to_ipm=NORMALISED,
                   why="DC with the siamese augmentation inside the loss.",
                   defaults={**_DC, "init": "real"}, source="Zhao & Bilen ICML'21, main.py --method DSA"),
    MatchingRecipe(name="dcc", feature_map="gradients", discrepancy="gradient_cosine_joint", sampler="fresh_inner",
                   augmentation="none", relation_to_ipm=NORMALISED,
                   why="DC's layer-wise cosine on the gradient of the loss over all classes jointly: the normalised "
                       "gradient IPM of the joint (x, y) distributions instead of the per-class conditionals.",
                   defaults=_DC,
                   source="Lee et al. ICML'22, Saehyung-Lee/DCC main.py (read in shared/reference/methods.md 2.6): "
                          "real gradient averaged over classes, synthetic gradient of the CE on the whole set, "
                          "match_loss 'ours'. Deviations: no class-wise DC warm-up (outer_warmup 250, inner_warmup "
                          "10: compose it by running dc first), DC's loop table instead of DCC's get_loops, DC "
                          "defaults otherwise"),
    MatchingRecipe(name="cafe", feature_map="layers", discrepancy="mean_embedding", sampler="fresh_watched",
                   augmentation="dsa", extra_terms=("prototype_discrimination",), relation_to_ipm=APPROXIMATE,
                   why="a weighted sum of per-layer linear-kernel IPM^2 (every block before pooling, and the "
                       "pooled embedding twice, as the reference's f4 and f5) plus a discriminative "
                       "cross-entropy term that is not an IPM.",
                   defaults={**_DC, "iterations": 2000, "layer_weights": (0.1, 0.1, 1.0), "embedding_weight": 2.0,
                             "inner_weight": 0.01, "lr_decay_at": (0.6, 0.8, 0.9)},
                   source="Wang et al. CVPR'22, kaiwang960112/CAFE distill.py and networks.py: per class the "
                          "squared mean difference of the three block activations before pooling (fourth, third, "
                          "second_weight 0.1, 0.1, 1.0), of the last pooled map f4 (first_weight 1.0) and of its "
                          "flatten f5 in loss_output (weight 1): the same vector, so embedding_weight 2; "
                          "inner_weight 0.01 x the summed CE of real embeddings against the synthetic class "
                          "means; a fresh network per iteration, image steps until a window of 10 running "
                          "real accuracies (128 per class) spreads less than lambda_1 0.04, between them epochs "
                          "on S until a window of 10 spreads more than lambda_2 0.03; SGD(lr_img, momentum "
                          "0.5) halved at 1200, 1600, 1800 of 2000. Deviations: the loops are capped "
                          "(max_steps_per_network, max_inner_epochs 100); the CE on real logits (no gradient "
                          "to S) is left out; DSA on (the reference defaults to DC without augmentation)"),
    MatchingRecipe(name="datadam", feature_map="attention", discrepancy="mean_embedding", sampler="fresh",
                   augmentation="dsa", relation_to_ipm=EXACT,
                   why="sum of linear-kernel IPM^2 on attention maps (x100) and on the embedding (x100*0.01).",
                   defaults={**_DM, "batch_real": 64, "attention_weight": 100.0, "embedding_weight": 1.0},
                   source="Sajedi et al. ICCV'23, main_DataDAM.py"),
    MatchingRecipe(name="lcmat", feature_map="gradients", discrepancy="gradient_cosine", sampler="fresh_inner",
                   augmentation="dsa", relation_to_ipm=APPROXIMATE,
                   why="sharpness-aware gradient matching: DSA's normalised gradient-matching IPM plus "
                       "lcmat_weight*(GM(theta + rho g/|g|) - GM(theta)), gradient matching again at LCMat's "
                       "first-order worst-case perturbation of the loss gap |l_T - l_S| (one normalised ascent step "
                       "in a rho-ball): not an IPM as a whole.",
                   defaults={**_DC, "init": "real", "lcmat_weight": 0.5, "lcmat_rho": 0.05},
                   source="Shin et al. AISTATS'23; LCMat-C (condensation) code unreleased (SJShin-AI/LCMat ships the "
                          "selection variant only), so this row is NOT LCMat's stated regulariser (the worst-case "
                          "loss gap max_{|eps|<=rho} |l_T(theta+eps) - l_S(theta+eps)|, bounded with rho and a "
                          "max-eigenvalue term of the Hessian difference): it applies LCMat's worst-case parameter "
                          "perturbation to the gradient-matching loss (a sharpness-aware variant of DSA); DSA "
                          "defaults, lcmat_weight 0.5 and lcmat_rho 0.05 are the library's, not the paper's"),
    MatchingRecipe(name="idm", feature_map="embedding", discrepancy="mean_embedding", sampler="pool",
                   augmentation="dsa", extra_terms=("synthetic_ce",), relation_to_ipm=APPROXIMATE,
                   why="linear-kernel IPM^2 of the embeddings of one network drawn from a pool of networks partly "
                       "trained on real data, plus a cross-entropy on S weighted by that network's running "
                       "training accuracy in percent (not an IPM).",
                   defaults={**_DM, "lr_images": 0.2, "ce_weight": 0.5, "initial_pool": 3,
                             "pool_train_after_step": True, "pool_augment": False},
                   source="Zhao et al. CVPR'23, uitrbn/IDM IDM_cifar10.py and command.txt (CIFAR10 IPC 1/10): "
                          "pool of up to net_num 100 ConvNets starting with 3, one more every 5 iterations; one "
                          "loss network per iteration (--train_net_num 1); after the image update fetch_net_num 2 "
                          "pool networks train model_train_steps 10 SGD steps (lr 0.01, momentum 0.9, wd 5e-4) on "
                          "plain real batches; syn_ce weighted by the loss network's ClassErrorMeter accuracy in "
                          "percent (reset every eval_interval 100) x ce_weight 0.5; embed_last 1000 = the full "
                          "embedding; SGD(lr_img 0.2, momentum 0.5). Deviations: pixels, not --aug's partition "
                          "and expansion (compose synthetic='multiformation'); one image step on the sum over "
                          "classes instead of one optimizer step per class; class-balanced pool batches (26 per "
                          "class) instead of 256 uniform; batch_real 256 for every IPC (command.txt: 5000 at IPC 1)"),
    MatchingRecipe(name="idc", feature_map="gradients", discrepancy="gradient_l1", sampler="pool", augmentation="dsa",
                   synthetic="multiformation", relation_to_ipm=EXACT,
                   why="L1 gradient matching (the IPM over an L-infinity ball of linear witnesses of the convolution "
                       "gradients) of the multi-formation decoded set, on one network trained on real data along "
                       "the way: the IPM of the pushed-forward set.",
                   defaults={"iterations": 200000, "lr_images": 1e-3, "batch_real": 64, "init": "real", "factor": 2,
                             "pool_size": 1, "generate_interval": 100, "fetch": 1, "train_steps": 8,
                             "lr_pool": 0.01, "batch_pool": 6},
                   source="Kim et al. ICML'22, snu-mllab/Efficient-Dataset-Condensation condense.py, argument.py, "
                          "misc/reproduce.py (MNIST: metric l1, lr_img 1e-4 in [0,1] pixels = ~1e-3 in normalised "
                          "space, batch_real 64, niter 2000 x inner_loop 100 image steps, factor 2, init mix, "
                          "fix_iter -1 -> 1: a new network every 100 image steps, trained 1 epoch on n_data=500 real "
                          "images after each step with SGD(0.01, momentum 0.9, wd 5e-4)). Deviations: the network is "
                          "trained by the pool sampler (pool_size 1, generate_interval 100) BEFORE each image step, "
                          "train_steps 8 x batch_pool 6 per class (~500 images), with DSA per sample instead of "
                          "CutMix; the siamese augmentation is DSA's, not IDC's color_crop_cutout DiffAug; all "
                          "decoded images are used (no batch_syn_max=128 subsample); no [0,1] clamping of the "
                          "stored pixels; a factor must divide the image size (IDC pads)"),
    MatchingRecipe(name="channel_efficient", feature_map="gradients", discrepancy="gradient_cosine",
                   sampler="fresh_inner", augmentation="dsa", synthetic="channelwise", relation_to_ipm=NORMALISED,
                   why="DSA's normalised gradient-matching IPM (layer-wise cosine of the class-mean loss gradients) "
                       "of the channel-wise decoded set: the decoder composes with the gradient feature map, so the "
                       "witnesses are f o decode read on the stored tensors.",
                   defaults={**_DC, "init": "real", "factor": 2},
                   source="Channel-efficient multi-formation (Zhou et al. 2024, as described in the issue): no paper "
                          "or code could be identified (shared/reference/methods.md), so the row is built from the "
                          "definition f_c: R^n -> R^{4n}: one stored tensor of one image's size holds factor**2 "
                          "low-resolution images in its channels, each upsampled bilinearly; gradient matching is "
                          "DSA's (Zhao & Bilen ICML'21 main.py --method DSA, its defaults). Choices: the decoder is "
                          "IDC's parameter-free bilinear upsampler, the start IDC's init mix (nearest shrink); with "
                          "them the decoded family equals multiformation's up to a re-indexing of the stored numbers "
                          "(tested)"),
    # ------------------------------------------------------------------ generative priors (synthetic "latent")
    MatchingRecipe(name="glad", feature_map="embedding", discrepancy="mean_embedding", sampler="fresh",
                   augmentation="dsa", synthetic="latent", relation_to_ipm=EXACT,
                   why="DM's squared linear-kernel IPM of random-network embeddings between the real set and the "
                       "push-forward G#nu_Z of the stored latents through a fixed generator: the IPM over the "
                       "witnesses f(G(z, y)) of the latents, S restricted to the generator's range.",
                   defaults={**_DM, "iterations": 1000, "lr_images": 0.01, "latent_init": "gaussian"},
                   source="Cazenavette et al. CVPR'23, GeorgeCazenavette/glad (distill_dm.py, glad_utils.py "
                          "prepare_latents / get_optimizer_img, shared_args.py): latents z ~ N(0, I), SGD momentum "
                          "0.5 at lr_w 0.01, Iteration 1000, the host method's loss unchanged. Deviations: a small "
                          "class-conditional DCGAN trained here (`ipmcondense generator`) instead of the pretrained "
                          "StyleGAN-XL, latents in its z space (no w+ space, no intermediate f-latents, no "
                          "--layer); DM is the default host: compose --method dc|dsa|mtt --synthetic latent "
                          "--generator DIR for GLaD-DC / GLaD-MTT"),
    MatchingRecipe(name="itgan", feature_map="embedding", discrepancy="mean_embedding", sampler="fresh",
                   augmentation="dsa", synthetic="latent", extra_terms=("anchor_features",),
                   relation_to_ipm=APPROXIMATE,
                   why="DM's linear-kernel IPM^2 of the push-forward G#nu_Z against the real set plus a pairwise "
                       "feature distance of each G(z_i) to the real image z_i was inverted from (not an IPM).",
                   defaults={**_DM, "iterations": 5000, "lr_images": 0.001, "latent_init": "inversion"},
                   source="Zhao & Bilen, NeurIPS'22 workshop (arXiv 2204.07513); VICO-UoE/IT-GAN releases only "
                          "evaluation and z-concatenation scripts (its training code is on Google Drive, "
                          "'neither re-organized nor validated'): latents from GAN inversion (lr_z 0.1), then "
                          "optimised at lr_z 0.001 for 5000 iterations (names of the released z files). "
                          "Deviations: a small class-conditional DCGAN trained here instead of BigGAN; latents only "
                          "for the condensed set (IT-GAN learns one per real image); inversion 200 Adam steps "
                          "(5000 in IT-GAN); the regulariser weight anchor_weight 0.01 and fresh random networks "
                          "are this library's reading of the paper (the file names mention fixed networks of "
                          "accuracy 0.4-1.0: try --sampler pool); SGD momentum 0.5 as DM"),
    MatchingRecipe(name="dcgm", feature_map="embedding", discrepancy="mean_embedding", sampler="fresh",
                   augmentation="dsa", synthetic="latent_gan",
                   extra_terms=("class_contrast",), relation_to_ipm=APPROXIMATE,
                   why="DM's linear-kernel IPM^2 between the real set and the push-forward G_psi#nu_Z, with both the "
                       "latents and the generator psi learned, plus a learned-critic GAN term (hinge, spectral norm: "
                       "W1-like only for a 1-Lipschitz critic) and two contrastive penalties on the synthetic set's "
                       "own geometry (not IPMs).",
                   defaults={**_DM, "iterations": 1000, "lr_images": 0.01, "latent_init": "gaussian"},
                   source="Zhang et al. arXiv 2309.07698 (DCGM). No official code is public (code index, the authors, "
                          "awesome-dataset-distillation lists no code), and the paper's full text could not be read "
                          "offline: the row follows its abstract and issue 18: latents and generator both optimised, "
                          "DM feature matching in random ConvNets, a GAN loss against a discriminator, an intra-class "
                          "loss pushing each sample away from the others of its class and an inter-class loss "
                          "widening the gaps between class centres. This library's choices (not the paper's): the "
                          "two losses are InfoNCE forms over cosine similarities in the step network's embedding "
                          "(intra: positive the real class centre, negatives the class-mates; inter: positive the "
                          "real centre, negatives the other synthetic centres), temperature 0.1, weights "
                          "intra/inter 0.1 and gan 0.1; the hinge GAN with the projection discriminator of the "
                          "generator run (fresh if none), one Adam step per iteration on ipc real images per class; "
                          "SGD on generator weights at lr_generator 1e-4; a small class-conditional DCGAN trained "
                          "here instead of a pretrained BigGAN; latents/lr/iterations as glad (DM host)"),
    # ------------------------------------------------------------------ other objectives
    ObjectiveRecipe(name="mtt", objective="mtt", augmentation="dsa", real_batches=None, relation_to_ipm=FIRST_ORDER,
                    why="first-order approximation: as the synthetic lr eta -> 0 the student's displacement after N "
                        "full-batch steps is -eta N times the synthetic gradient at theta_t, so the loss compares an "
                        "accumulated synthetic gradient with the expert's displacement: accumulated gradient matching "
                        "along the expert trajectory.",
                    defaults={"iterations": 5000, "lr_images": 100.0, "init": "real", "syn_steps": 20,
                              "expert_epochs": 2, "max_start_epoch": 20, "lr_lr": 1e-5},
                    source="Cazenavette et al. CVPR'22, distill.py (DC-BENCH table); the per-IPC CIFAR-10/100 settings "
                           "(syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, batch_syn, ZCA) of the "
                           "authors' commands in DC-BENCH methods/tm/readme.md are rows of configs/cifar10.toml and "
                           "cifar100.toml; with zca the experts must be trained whitened (experts --zca)"),
    ObjectiveRecipe(name="haba", objective="mtt", augmentation="dsa", real_batches=None, synthetic="haba",
                    relation_to_ipm=APPROXIMATE,
                    why="MTT (first order: accumulated gradient matching along the expert trajectory) of the "
                        "hallucinated set h_j(b_i), the IPM of the pushed-forward set, plus HaBa's club term on the "
                        "hallucinators (cosine of an adversarially trained extractor's embeddings), not an IPM.",
                    defaults={"iterations": 15000, "lr_images": 100.0, "momentum_images": 0.95, "init": "real",
                              "syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20, "lr_lr": 1e-5,
                              "n_hallucinators": 5},
                    source="Liu et al. NeurIPS'22, Huage001/DatasetFactorization distill_fac.py, utils.py "
                           "(StyleTranslator), contrastive_loss.py (SupConLoss, Extractor), "
                           "run_cifar10_ipc10_style5.sh (syn_steps 30, expert_epochs 2, max_start_epoch 20, lr_img = "
                           "lr_style 100, SGD momentum 0.95 on bases and hallucinators, lr_lr 1e-5, 5 hallucinators, "
                           "lambdas club 0.1 / cls 1 / likelihood 0.1 / contrast 0.1, extractor SGD 0.001 momentum "
                           "0.9, Iteration 15000). Deviations: every student step unrolls on the whole decoded set "
                           "(or batch_syn decoded images mixing hallucinators) instead of one random hallucinator "
                           "applied to a batch of bases; the contrastive pairs use every basis, not the next "
                           "batch_syn chunk; the evaluation trains on all n_hallucinators x ipc decoded images "
                           "instead of one random hallucination per basis per epoch; the learned lr uses MTT's "
                           "momentum 0.5 (HaBa 0.9) and is not clipped at 0.001; the extractor is a ConvNet of the "
                           "row's arch (HaBa: ConvNet-3 width 128); no ZCA on digits/MNIST (as mtt); the evaluation does "
                           "not standardise each batch by its own mean and std (HaBa utils.py epoch() does, in "
                           "training and test), so the hallucinators' output scale matters here"),
    ObjectiveRecipe(name="kip", objective="kip", relation_to_ipm=NOT_AN_IPM,
                    why="not an IPM: KRR regression loss of the predictor fitted on S; its witness class is the "
                        "RKHS of the (NTK) kernel, the MMD with that kernel is the IPM counterpart.",
                    defaults={"iterations": 1000, "lr_images": 0.04, "optimizer_images": "adam", "init": "real",
                              "batch_real": 500, "kernel": "fc_ntk", "krr_reg": 1e-6, "lr_labels": 0.04},
                    source="Nguyen et al. ICLR'21, KIP.ipynb (FC kernel); kernel='conv_ntk': Nguyen et al. "
                           "NeurIPS'21, the ConvNet of google-research kip/nn_training.ipynb (prepended conv + 3 x "
                           "[conv3x3 SAME, ReLU, AvgPool2], Flatten, Dense; W_std sqrt 2, b_std 0.1, NTK "
                           "parameterisation), kernel by the neural-tangents stax rules; learn_labels: KIP.ipynb "
                           "get_update_functions takes one Adam(LEARNING_RATE 0.04) over {'x', 'y'}, so lr_labels = "
                           "lr_images = 0.04. Deviations: no ZCA, no augmentation"),
    ObjectiveRecipe(name="rfad", objective="rfad", relation_to_ipm=NOT_AN_IPM,
                    why="not an IPM: Platt-scaled KRR loss with the random-feature NNGP kernel of random no-norm "
                        "ConvNets: the same construction as DM's random-feature kernel E<phi(x), phi(x')>, with "
                        "another network and a regression loss instead of a mean-embedding IPM.",
                    defaults={"iterations": 1000, "lr_images": 1e-3, "optimizer_images": "adam", "init": "real",
                              "batch_real": 128, "kernel": "rf_nngp", "krr_reg": 5e-3, "n_models": 8,
                              "rf_width": 256},
                    source="Loo et al. NeurIPS'22, yolky/RFAD (Adam for AdaBelief)"),
    ObjectiveRecipe(name="dd", objective="dd", sampler="fresh", relation_to_ipm=NOT_AN_IPM,
                    why="not an IPM: bilevel performance objective (real-data loss after unrolled SGD on S, each "
                        "step on its own synthetic batch with its own learned step size).",
                    defaults={"iterations": 1000, "lr_images": 0.01, "optimizer_images": "adam",
                              "adam_betas": (0.5, 0.999), "init": "real", "batch_real": 100, "dd_steps": 10,
                              "dd_epochs": 3, "dd_lr_init": 0.02},
                    source="Wang et al. 2018, SsnL/dataset-distillation train_distilled_image.py, base_options.py, "
                           "basics.py (unknown_init): distill_steps 10 batches of distilled_images_per_class_per_step "
                           "images per class, distill_epochs 3 passes, 30 softplus step sizes (init distill_lr "
                           "0.02), Adam(lr 0.01, betas (0.5, 0.999)) on images and step sizes, a fresh network per "
                           "step, the evaluation replays the 30 steps (evaluate_steps). Deviations: IPC = images "
                           "per class over all batches, dealt round-robin (dd_step_batches; fewer images than "
                           "steps reuse them); a class-balanced real batch (batch_real per class) instead of 1024 "
                           "uniform; no StepLR decay of the Adam step (decay_epochs 40, factor 0.5); init 'real' "
                           "(the reference starts from noise)"),
    ObjectiveRecipe(name="esp", objective="esp", relation_to_ipm=NOT_AN_IPM,
                    why="not an IPM: DD's bilevel objective (real-data loss after unrolled SGD on S) with the inner "
                        "parameters projected onto the span of the expert trajectories, a restriction of the inner "
                        "hypothesis class, not a witness class, plus the distance of S's unprojected steps from "
                        "that span.",
                    defaults={"iterations": 1000, "lr_images": 0.01, "optimizer_images": "adam", "init": "real",
                              "batch_real": 100, "dd_steps": 10, "dd_lr_init": 0.02, "esp_residual_weight": 10.0},
                    source="Ma et al., Sensors 23(19):8148, 2023 (Expert Subspace Projection): no code is public and "
                           "only the abstract could be read, so the row follows issue 12's definition: DD "
                           "(ssnl/dataset-distillation, its defaults, as the dd row) with projected inner steps "
                           "theta <- P_V(theta - eta grad), V = span of every snapshot of every expert in the buffer, "
                           "starting at an expert's initialisation, and the abstract's constraint on the synthetic "
                           "set's trajectory as a loss term: esp_residual_weight (10, the library's) times the mean "
                           "relative distance |(I - P_V) g|^2 / |g|^2 of the unprojected steps g from V (without it "
                           "S is free off V, where full-space training follows it: digits IPC 1 fell to 50.6%, "
                           "below the 78.9% of random real images). Deviation: the abstract says ESP avoids "
                           "unrolling (its loss is unknown here); this row unrolls"),
    ObjectiveRecipe(name="rcig", objective="rcig", relation_to_ipm=NOT_AN_IPM,
                    why="not an IPM: bilevel performance objective (real-data cross-entropy of a KRR last layer fitted "
                        "on S over a network linearised around pool models trained online on S; implicit gradient "
                        "through the tangent offset, clipped to the direct gradient's norm).",
                    defaults={"iterations": 1000, "lr_images": 0.003, "optimizer_images": "adam", "init": "real",
                              "batch_real": 100, "rcig_l2": 5e-4, "rcig_inner_steps": 20},
                    source="Loo et al. ICML'23, yolky/RCIG algorithms.py (run_rcig, do_meta_train_step, "
                           "get_krr_loss_gd, do_training_steps, get_tree_mask) and configs_final/depth_3.txt: pool of "
                           "30 models trained online on S (1..15 Adam(5e-5) steps per visit, reset after 100), "
                           "linearised network with a tangent on all but the last layer's weight (20 inner Adam(1e-4) "
                           "steps), closed-form KRR last layer (l2 5e-4), learned labels at the image rate, learned "
                           "log-temperature (step 0.03), 20 Hessian-inverse steps, implicit gradient clipped to the "
                           "direct gradient's norm. Deviations: Adam for AdaBelief (images, labels, temperature); "
                           "no EMA of the images; the Hessian-inverse by the library's CG or Neumann series instead "
                           "of 20 Adam steps on the quadratic; no automatic tuning of the inner and Hessian-inverse "
                           "step sizes; the pool model is trained on S before the image update (the reference: "
                           "after); a class-balanced real batch (batch_real per class); the label-margin term left "
                           "out; the evaluation trains on the hard labels (as for KIP's learned labels)"),
    # ------------------------------------------------------------------ selection baselines
    SelectionRecipe(name="random", selection="random", relation_to_ipm=APPROXIMATE,
                    why="uniform real images per class: unbiased but not optimised for any IPM.",
                    defaults={"iterations": 0}, source="real-data baseline"),
    SelectionRecipe(name="herding", selection="herding", relation_to_ipm=APPROXIMATE,
                    why="greedy (kernel herding) minimisation of the mean-embedding IPM over real images.",
                    defaults={"iterations": 0}, source="Welling ICML'09; Chen et al. UAI'10"),
    SelectionRecipe(name="kcenter", selection="kcenter", relation_to_ipm=APPROXIMATE,
                    why="greedy minimax coverage in feature space: a covering radius, not an IPM.",
                    defaults={"iterations": 0}, source="Sener & Savarese ICLR'18"),
)

_RECIPES: dict[str, Recipe] = {r.name: r for r in _ROWS}
#: Every row by method name, a read-only live view that :func:`register_recipe` extends.
RECIPES: Mapping[str, Recipe] = MappingProxyType(_RECIPES)
#: The names of the rows that ship with the library.
METHOD_NAMES = tuple(_RECIPES)


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a row to :data:`RECIPES` (a new method from user code or a plugin); returns it.

    The row is validated like the built-in ones (every axis must be a registered component); a name
    that is taken raises ``ValueError``. Composition (``+`` in the name) is reserved for
    :func:`compose_recipe`.
    """
    if not isinstance(recipe, (MatchingRecipe, ObjectiveRecipe, SelectionRecipe)):
        raise TypeError(f"recipe must be a MatchingRecipe, ObjectiveRecipe or SelectionRecipe, got {type(recipe).__name__}")
    if not recipe.name or "+" in recipe.name or recipe.name != recipe.name.lower().strip():
        raise ValueError(f"recipe name must be a lower-case name without '+', got {recipe.name!r}")
    if recipe.name in _RECIPES:
        raise ValueError(f"method {recipe.name!r} is already registered")
    recipe.validate()
    _RECIPES[recipe.name] = recipe
    return recipe

# Per-dataset settings and budgets: one TOML file per dataset, each value beside its source
# (configs/<dataset>.toml, read by dataset_config.py). Imported here, after COMMON_DEFAULTS and
# METHOD_NAMES, because the loader validates the files against them.
from .dataset_config import DATASET_BUDGETS, DATASET_DEFAULTS, DATASET_IPC_BUDGETS  # noqa: E402



def get_recipe(name: str) -> Recipe:
    """The registry row ``name``; unknown names raise ``ValueError`` listing :data:`METHOD_NAMES`."""
    check_choice(name, tuple(_RECIPES), "method")
    return _RECIPES[name]


_MATCHING_AXES = ("feature_map", "discrepancy", "sampler")


def compose_recipe(
    method: str = "dm",
    *,
    feature_map: str | None = None,
    discrepancy: str | None = None,
    sampler: str | None = None,
    augmentation: str | None = None,
    synthetic: str | None = None,
    real_batches: str | None = None,
) -> Recipe:
    """A registry row with some axes replaced: free composition without new code.

    ``compose_recipe("dm", discrepancy="mmd2")`` is M3D; ``compose_recipe("dc", discrepancy="mmd2",
    sampler="fresh")`` is gradient matching with a Gaussian MMD on frozen random networks;
    ``synthetic`` and ``real_batches`` swap the parameterisation of S and the real-batch selector of any
    optimised row. The defaults stay those of ``method``. The composed row is named
    ``"<method>+<axis>=<value>+..."``; a new discrepancy sets ``relation_to_ipm`` from the discrepancy.
    Unknown names raise ``ValueError`` listing the choices of that axis.
    """
    base = get_recipe(method)
    if discrepancy is not None:
        discrepancy = canonical_discrepancy_name(discrepancy)
    requested = {"feature_map": feature_map, "discrepancy": discrepancy, "sampler": sampler,
                 "augmentation": augmentation, "synthetic": synthetic, "real_batches": real_batches}
    for axis, registry in (("feature_map", FEATURE_MAPS), ("discrepancy", DISCREPANCIES), ("sampler", SAMPLERS),
                           ("synthetic", SYNTHETIC_SETS), ("real_batches", REAL_BATCH_SELECTORS)):
        if requested[axis] is not None:
            registry.get(requested[axis])
    if augmentation is not None:
        check_choice(augmentation, AUGMENTATION_NAMES, "augmentation")
    changes = {k: v for k, v in requested.items() if v is not None and v != getattr(base, k, None)}
    if not changes:
        return base
    if base.is_selection:
        raise ValueError(f"method {method!r} is a selection baseline: its axes cannot be changed")
    if isinstance(base, ObjectiveRecipe):
        fixed = [k for k in ("feature_map", "discrepancy", "augmentation") if k in changes]
        if fixed:
            raise ValueError(
                f"method {method!r} uses the {base.objective!r} objective, not feature matching: its "
                f"{', '.join(fixed)} cannot be changed (use --set for its hyperparameters)"
            )
        if "real_batches" in changes and base.real_batches is None:
            raise ValueError(f"method {method!r} draws no real batches: real_batches cannot be set")
    if "discrepancy" in changes:
        relation = DISCREPANCIES.get(changes["discrepancy"]).relation_to_ipm
        if getattr(base, "extra_terms", ()):
            relation = APPROXIMATE
        changes.update(relation_to_ipm=relation,
                       why=f"composed from {method!r} with discrepancy {changes['discrepancy']!r} ({relation}).")
    suffix = "+".join(f"{k}={v}" for k, v in changes.items() if k in requested)
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
