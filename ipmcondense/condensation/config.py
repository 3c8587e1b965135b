"""The flat hyperparameter table of a run, derived from the components' options.

A run's configuration is one flat ``{name: value}`` mapping (saved in ``synthetic.pt``, ``metrics.json``
and checkpoints, overridable with ``--set KEY=VALUE``). Its keys and defaults are not listed by hand:
:data:`COMMON_DEFAULTS` is the union of the engine's own options (:class:`EngineOptions`) and the
``Options`` dataclass of every registered component (feature maps, discrepancies, parameter samplers,
extra terms, objectives, synthetic-set parameterisations, real-batch selectors). A new component brings
its options, with their defaults and sources, into the table by being registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from ipmcondense.components import Registry, option, option_sources
from ipmcondense.features import FEATURE_MAPS

from .discrepancies import DISCREPANCIES
from .extra_terms import EXTRA_TERMS
from .objectives import OBJECTIVES
from .real_batches import REAL_BATCH_SELECTORS
from .samplers import SAMPLERS
from .synthetic import SYNTHETIC_SETS

__all__ = ["EngineOptions", "COMMON_DEFAULTS", "HYPERPARAMETER_KEYS", "COMPONENT_REGISTRIES", "hyperparameter_sources"]


@dataclass(frozen=True)
class EngineOptions:
    """Options of the loop itself (every recipe has them). Reference values of VICO-UoE DC/DSA/DM."""

    arch: str = option("convnet", "DC/DM: ConvNet-3, the network of the feature map and of the evaluation")
    iterations: int = option(1000, "DC main.py: --Iteration 1000 (outer iterations)")
    lr_images: float = option(0.1, "DC main.py: --lr_img 0.1 (SGD on S)")
    momentum_images: float = option(0.5, "DC/DM: SGD(image_syn, momentum=0.5)")
    batch_real: int = option(256, "DC/DM: --batch_real 256 (real images per class per step)")
    init: str = option("real", "DM: --init real (real | noise | random | herding | kcenter | kmeans)")
    lr_decay_at: tuple[float, ...] = option((), "fractions of `iterations` where lr_images is multiplied by lr_decay")
    lr_decay: float = option(0.5, "CAFE: halve the image step at each decay point")
    class_batching: bool = option(True, "one forward pass for all classes where the recipe allows (library)")
    checkpoint_every: int = option(0, "0: 20 checkpoints per run (and always the last iteration)")
    eval_every: int = option(0, "0: no evaluation during condensation")
    eval_models: int = option(1, "models per evaluation during condensation")
    eval_epochs: int | None = option(None, "None: the protocol default (1000 with DSA)")
    optimizer_images: str = option("sgd", "sgd (momentum_images) or adam (KIP, DD, RCIG)")
    adam_betas: tuple[float, ...] = option((0.9, 0.999), "torch's Adam default; the dd row sets ssnl's (0.5, 0.999)")
    zca: bool = option(False, "MTT/KIP/RFAD/RCIG on CIFAR: condense (and evaluate) in the ZCA-whitened space of "
                              "the full training set (MTT utils.py get_dataset --zca)")
    zca_eps: float = option(0.1, "MTT utils.py: K.enhance.ZCAWhitening(eps=0.1); RFAD get_zca_matrix reg_coef=0.1")
    precision: str = option("float32", "the references compute in float32; bfloat16 autocasts the networks' forward "
                                       "passes of matching recipes (library option, the `fast` profile)")
    channels_last: bool = option(False, "the references use contiguous (NCHW) tensors; true runs the no-autograd "
                                        "real-side passes of matching recipes in channels_last memory format (library "
                                        "option, the `fast` profile)")


#: Every registry whose components contribute options to the flat table, by axis.
COMPONENT_REGISTRIES: Mapping[str, Registry] = MappingProxyType({
    "feature_map": FEATURE_MAPS,
    "discrepancy": DISCREPANCIES,
    "sampler": SAMPLERS,
    "extra_terms": EXTRA_TERMS,
    "objective": OBJECTIVES,
    "synthetic": SYNTHETIC_SETS,
    "real_batches": REAL_BATCH_SELECTORS,
})


def _derive() -> tuple[dict[str, Any], dict[str, str]]:
    table = {f.name: f.default for f in fields(EngineOptions)}
    sources = option_sources(EngineOptions)
    owner = dict.fromkeys(table, "the engine")
    for axis, registry in COMPONENT_REGISTRIES.items():
        for key, value in registry.option_defaults().items():
            if key in table and table[key] != value:
                raise ValueError(
                    f"hyperparameter {key!r} has default {table[key]!r} in {owner[key]} and {value!r} in the "
                    f"{axis} components"
                )
            table.setdefault(key, value)
            owner.setdefault(key, f"the {axis} components")
        for cls in registry.values():
            for key, source in option_sources(cls.Options).items():
                sources.setdefault(key, f"{registry.kind} {cls.name!r}: {source}" if source else "")
    return table, sources


_TABLE, _SOURCES = _derive()

#: ``{hyperparameter: default}`` of every option of the engine and of every registered component.
COMMON_DEFAULTS: Mapping[str, Any] = MappingProxyType(_TABLE)
HYPERPARAMETER_KEYS = tuple(COMMON_DEFAULTS)


def hyperparameter_sources() -> dict[str, str]:
    """``{hyperparameter: where its default comes from}``, as declared beside each option."""
    return dict(_SOURCES)
