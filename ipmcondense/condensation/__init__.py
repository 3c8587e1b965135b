"""The condensation engine: recipe axes as registered components, objectives, the one loop and the recipe table.

Every method is a row of :data:`ipmcondense.condensation.recipes.RECIPES` (a matching row: feature map x
discrepancy x parameter sampler; or a non-matching objective; or a selection baseline), each with a
``synthetic`` parameterisation and a ``real_batches`` selector; :func:`ipmcondense.condensation.api.condense`
runs any row, or any new combination of axes, through :class:`ipmcondense.condensation.engine.CondensationEngine`.
"""

from .api import CondensationResult, condense, evaluate
from .config import COMMON_DEFAULTS, EngineOptions
from .discrepancies import DISCREPANCIES, DISCREPANCY_NAMES, Discrepancy, get_discrepancy
from .engine import CondensationEngine, matching_loss, siamese_augment
from .extra_terms import EXTRA_TERMS, ExtraTerm
from .objectives import OBJECTIVE_NAMES, OBJECTIVES, Objective
from .real_batches import REAL_BATCH_NAMES, REAL_BATCH_SELECTORS, RealBatchSelector
from .recipes import (
    METHOD_NAMES,
    RECIPES,
    MatchingRecipe,
    ObjectiveRecipe,
    Recipe,
    SelectionRecipe,
    compose_recipe,
    get_recipe,
    register_recipe,
    resolve_config,
)
from .samplers import SAMPLER_NAMES, SAMPLERS, ParameterSampler, get_sampler
from .synthetic import SYNTHETIC_NAMES, SYNTHETIC_SETS, PixelSet, SyntheticExtras, SyntheticSet

__all__ = [
    "condense",
    "evaluate",
    "CondensationResult",
    "Recipe",
    "MatchingRecipe",
    "ObjectiveRecipe",
    "SelectionRecipe",
    "RECIPES",
    "METHOD_NAMES",
    "get_recipe",
    "register_recipe",
    "compose_recipe",
    "resolve_config",
    "COMMON_DEFAULTS",
    "EngineOptions",
    "CondensationEngine",
    "matching_loss",
    "siamese_augment",
    "SyntheticSet",
    "SyntheticExtras",
    "PixelSet",
    "SYNTHETIC_SETS",
    "SYNTHETIC_NAMES",
    "RealBatchSelector",
    "REAL_BATCH_SELECTORS",
    "REAL_BATCH_NAMES",
    "Discrepancy",
    "DISCREPANCIES",
    "DISCREPANCY_NAMES",
    "get_discrepancy",
    "ExtraTerm",
    "EXTRA_TERMS",
    "Objective",
    "OBJECTIVES",
    "OBJECTIVE_NAMES",
    "ParameterSampler",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "get_sampler",
]
