"""Generators trained here, offline, on the data at hand: the priors of the latent-space condensation rows.

* :mod:`~ipmcondense.generators.gan`: a small class-conditional DCGAN-style GAN sized to the images;
* :mod:`~ipmcondense.generators.runs`: :func:`train_generator` (progress, atomic checkpoints, resume, sample
  grid, quality score), :func:`load_generator`, :func:`check_generator` for a user's ``nn.Module``;
* :mod:`~ipmcondense.generators.diffusion`: a small class-conditional DDPM (U-Net, DDPM and DDIM samplers) wrapped
  as a generator (:class:`DiffusionGenerator`), trained by ``train_generator(kind="diffusion")``;
* :mod:`~ipmcondense.generators.minimax`: minimax diffusion, fine-tuning it with the representativeness and
  diversity terms (:func:`minimax_finetune`);
* :mod:`~ipmcondense.generators.dim`: DiM, distilling the dataset into the generator (:func:`distill_into_generator`);
* :mod:`~ipmcondense.generators.quality`: the FID-like score, an MMD in a fixed random ConvNet embedding.
"""

from .diffusion import (
    NOISE_SCHEDULES,
    ConditionalUNet,
    DiffusionGenerator,
    NoiseSchedule,
    ddim_sample,
    ddpm_sample,
    epsilon_loss,
    predict_x0,
    q_sample,
)
from .dim import distill_into_generator, logit_matching_loss
from .gan import ConditionalDiscriminator, ConditionalGenerator, hinge_losses, upsampling_plan
from .quality import QUALITY_EMBEDDING, random_convnet_mmd2
from .minimax import MINIMAX_TRAINABLE, MinimaxMemory, minimax_finetune, minimax_terms
from .runs import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DIFFUSION_DEFAULT_EPOCHS,
    GENERATOR_FILE,
    GENERATOR_FORMAT,
    GENERATOR_KINDS,
    GeneratorRun,
    check_generator,
    load_generator,
    save_sample_grid,
    train_generator,
)

__all__ = [
    "ConditionalGenerator",
    "ConditionalDiscriminator",
    "hinge_losses",
    "upsampling_plan",
    "random_convnet_mmd2",
    "QUALITY_EMBEDDING",
    "train_generator",
    "load_generator",
    "check_generator",
    "save_sample_grid",
    "GeneratorRun",
    "GENERATOR_KINDS",
    "GENERATOR_FILE",
    "GENERATOR_FORMAT",
    "DEFAULT_EPOCHS",
    "distill_into_generator",
    "logit_matching_loss",
    "DiffusionGenerator",
    "ConditionalUNet",
    "NoiseSchedule",
    "NOISE_SCHEDULES",
    "q_sample",
    "predict_x0",
    "epsilon_loss",
    "ddpm_sample",
    "ddim_sample",
    "DIFFUSION_DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "minimax_terms",
    "minimax_finetune",
    "MinimaxMemory",
    "MINIMAX_TRAINABLE",
]
