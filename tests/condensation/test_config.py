"""The flat hyperparameter table is derived from the components' options, and every option has a source."""

import dataclasses
import json

from ipmcondense.condensation.config import (
    COMMON_DEFAULTS,
    COMPONENT_REGISTRIES,
    EngineOptions,
    hyperparameter_sources,
)
from ipmcondense.condensation.recipes import RECIPES, resolve_config


def test_common_defaults_is_the_union_of_the_engine_and_component_options():
    expected = {f.name: f.default for f in dataclasses.fields(EngineOptions)}
    for registry in COMPONENT_REGISTRIES.values():
        for cls in registry.values():
            for f in dataclasses.fields(cls.Options):
                assert COMMON_DEFAULTS[f.name] == f.default, f"{cls.name}.{f.name}"
                expected.setdefault(f.name, f.default)
    assert dict(COMMON_DEFAULTS) == expected


def test_known_keys_and_values_of_the_reference_table():
    # values that the benchmark cells and the golden sets were produced with
    assert COMMON_DEFAULTS["lr_images"] == 0.1 and COMMON_DEFAULTS["batch_real"] == 256
    assert COMMON_DEFAULTS["outer_loop"] is None and COMMON_DEFAULTS["pool_size"] == 100
    assert COMMON_DEFAULTS["bandwidth"] == "median" and COMMON_DEFAULTS["syn_steps"] == 20
    # the table the benchmark cells were keyed with (62 keys), plus the options added since at their defaults,
    # which cached cells accept (benchmarks/grid/cells.py keys_match): sinkhorn_p (sinkhorn), steps_per_network
    # (fresh), factor (multiformation), dream_interval and dream_max_iter (dream); + 5 of the pool sampler
    # (loss_networks, initial_pool, pool_train_after_step, pool_augment, accuracy_reset_interval: IDM's schedule)
    # + 2 of DD (dd_epochs, adam_betas); + 6 of CAFE's fresh_watched sampler (watch_window, outer_stop_spread,
    # inner_stop_spread, watch_batch, max_steps_per_network, max_inner_epochs)
    # + 2: zca, zca_eps (engine: ZCA whitening, issue 11 item 4)
    # + 6: pretrain_steps, lr_pretrain, batch_pretrain (sampler 'pretrained'), barycenter_iterations (w2_barycenter),
    # bn_weight, teacher_ce_weight (WMDD's extra terms; issue 11 item 7)
    # + 10 of the haba synthetic set (n_hallucinators, hallucinator_kernel, basis_channels, lr_hallucinators,
    # 4 loss weights, temperature, lr_extractor); + 1 of the esp objective (esp_rank)
    # + 5: latent (4) and anchor_weight (IT-GAN's anchor term; issue 18)
    # + 2: conv_depth, conv_readout (kip's ConvNet kernel; issue 11 item 3)
    # + 6: RCIG's pool, online training, inner Adam step and temperature step (issue 11 item 2)
    # + 6: DCGM (issue 18): lr_generator, gan_weight, lr_discriminator (latent_gan), intra_weight, inter_weight,
    # dcgm_temperature (its two extra terms)
    # + 1: esp_residual_weight (the esp objective's distance of the synthetic steps from the span)
    # + 2: precision, channels_last (the engine's bfloat16 autocast and memory-format options; issue 16)
    assert len(COMMON_DEFAULTS) == 62 + 5 + 5 + 2 + 6 + 2 + 6 + 10 + 1 + 5 + 2 + 6 + 6 + 1 + 2 and COMMON_DEFAULTS["factor"] == 2
    assert (COMMON_DEFAULTS["dream_interval"], COMMON_DEFAULTS["dream_max_iter"]) == (10, 100)
    assert (COMMON_DEFAULTS["sinkhorn_p"], COMMON_DEFAULTS["steps_per_network"]) == (2, 1)


def test_every_hyperparameter_has_a_stated_source():
    sources = hyperparameter_sources()
    missing = [k for k in COMMON_DEFAULTS if not sources.get(k)]
    assert not missing, f"options without a source: {missing}"


def test_resolved_configs_are_json_serialisable_for_every_row():
    for name, recipe in RECIPES.items():
        json.dumps(resolve_config(recipe, "digits", ipc=10))
