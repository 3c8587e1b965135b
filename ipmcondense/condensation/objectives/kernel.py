r"""Kernel objectives: KIP (kernel inducing points) and RFAD (random-feature approximation), by kernel ridge regression.

:func:`build_kernel` gives the kernels (:data:`KERNEL_NAMES`) of :mod:`ipmcondense.ipm.neural_kernels`;
the loss is :func:`ipmcondense.ipm.kernel_regression.krr_loss` of the predictor fitted on S, evaluated on
a real batch from the ``real_batches`` axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ipmcondense.components import option
from ipmcondense.ipm._validation import check_choice
from ipmcondense.nets import build_isolated, get_network

from ..synthetic import SyntheticExtras
from .base import Objective, ObjectiveContext, check_options, draw_network

__all__ = ["KernelInducingPointsObjective", "RandomFeatureKRRObjective", "build_kernel", "KERNEL_NAMES"]

#: Kernels the ``kip`` objective accepts (``config["kernel"]``).
KERNEL_NAMES = ("fc_ntk", "fc_nngp", "conv_ntk", "conv_nngp", "empirical_ntk", "rf_nngp")
#: Readouts of the infinite-width ConvNet kernels (``config["conv_readout"]``).
CONV_READOUT_NAMES = ("flatten", "global_average")


def build_kernel(
    name: str,
    input_shape: Sequence[int],
    *,
    depth: int = 1,
    network: nn.Module | None = None,
    network_factory: Callable[[torch.Generator], nn.Module] | None = None,
    n_models: int = 8,
    conv_readout: str = "flatten",
) -> nn.Module:
    """A kernel on flattened images ``(n, prod(input_shape))`` for KRR objectives.

    ``"fc_ntk"`` / ``"fc_nngp"``: closed-form kernels of a fully connected ReLU network of ``depth``
    hidden layers (:class:`~ipmcondense.ipm.neural_kernels.FullyConnectedNTK`); ``"conv_ntk"`` /
    ``"conv_nngp"``: closed-form kernels of KIP's infinitely wide ConvNet with ``depth`` pooled
    blocks and the ``conv_readout`` readout (:class:`~ipmcondense.ipm.neural_kernels.ConvNetNTK`,
    :math:`\\sigma_w = \\sqrt 2, \\sigma_b = 0.1`, one prepended convolution); ``"empirical_ntk"``:
    :class:`~ipmcondense.ipm.neural_kernels.EmpiricalNTK` of ``network`` (mean over outputs);
    ``"rf_nngp"``: :class:`~ipmcondense.ipm.neural_kernels.RandomFeatureNNGP` of ``n_models`` networks from
    ``network_factory`` (scale 2, offset 0.01 as RFAD).
    """
    from ipmcondense.ipm.neural_kernels import (
        ConvNetNNGP,
        ConvNetNTK,
        EmpiricalNTK,
        FullyConnectedNNGP,
        FullyConnectedNTK,
        RandomFeatureNNGP,
    )

    check_choice(name, KERNEL_NAMES, "kernel")
    if name == "fc_ntk":
        return FullyConnectedNTK(depth)
    if name == "fc_nngp":
        return FullyConnectedNNGP(depth)
    if name in ("conv_ntk", "conv_nngp"):
        if len(input_shape) != 3:
            raise ValueError(f"kernel {name!r} needs (channels, height, width) images, got input_shape {tuple(input_shape)}")
        kernel_class = ConvNetNTK if name == "conv_ntk" else ConvNetNNGP
        return kernel_class(tuple(int(s) for s in input_shape), depth=depth, readout=conv_readout)
    if name == "empirical_ntk":
        if network is None:
            raise ValueError("kernel 'empirical_ntk' needs a network")
        return EmpiricalNTK(network, input_shape=tuple(input_shape), output_reduction="mean")
    if network_factory is None:
        raise ValueError("kernel 'rf_nngp' needs a network_factory")
    return RandomFeatureNNGP(network_factory, n_models, input_shape=tuple(input_shape), scale=2.0, offset=0.01)


def _random_convnet_factory(dataset: Any, width: int) -> Callable[[torch.Generator], nn.Module]:
    """RFAD's networks: ConvNet without normalisation, NNGP (Gaussian) initialisation from the generator."""
    from ipmcondense.ipm.neural_kernels import gaussian_init_

    def factory(generator: torch.Generator) -> nn.Module:
        net = build_isolated(lambda: get_network("convnet-nn", dataset.channels, dataset.num_classes,
                                                 tuple(dataset.image_size), width=width))
        return gaussian_init_(net, generator=generator)

    return factory


class KernelInducingPointsObjective(Objective):
    r"""KIP: kernel ridge regression from S to a real batch T (Nguyen et al. 2021).

    .. math:: L(S) = \tfrac12\, \mathrm{mean}\big(Y_T - K_{TS}(K_{SS} + \lambda I)^{-1} Y_S\big)^2,
              \quad \lambda = \mathrm{krr\_reg}\cdot \mathrm{tr}(K_{SS})/|S|

    (:func:`~ipmcondense.ipm.kernel_regression.krr_loss`, solved in float64), with class-balanced real
    targets (``batch_real`` per class), centred one-hot :math:`Y_T`, :math:`Y_S` centred one-hot or
    learned (``learn_labels``). ``kernel``: ``"fc_ntk"`` (default; ``kernel_depth`` hidden layers),
    ``"fc_nngp"``, ``"conv_ntk"`` / ``"conv_nngp"`` (KIP's infinitely wide ConvNet: ``conv_depth``
    pooled blocks after one prepended convolution, ``conv_readout`` ``"flatten"`` or
    ``"global_average"``; :math:`O(|S|(|S| + |T|)(HW)^2)`, small images only), ``"empirical_ntk"`` (of a fresh ``arch`` network per step) or ``"rf_nngp"``
    (``n_models`` random no-norm ConvNets of width ``rf_width``, fresh per step).

    **Relation to an IPM**: none. The predictor lies in the RKHS of the kernel (the witness class of
    the MMD with that kernel), but the loss is a label regression error of the fitted predictor, not a
    supremum of mean differences.

    Cost: :math:`O(|S|^2 + |S||T|)` kernel entries + an :math:`O(|S|^3)` solve per step.
    """

    name = "kip"
    relation_to_ipm = "not an IPM: KRR regression loss, witness class an RKHS"
    loss_name = "mse"

    @dataclass(frozen=True)
    class Options:
        kernel: str = option("fc_ntk", "KIP.ipynb: FC NTK kernel")
        kernel_depth: int = option(1, "KIP.ipynb: one hidden layer")
        conv_depth: int = option(3, "KIP ConvNet (nn_training.ipynb): depth 3 pooled blocks + a prepended conv")
        conv_readout: str = option("flatten", "KIP ConvNet: use_gap=False (Flatten before the Dense readout)")
        krr_reg: float = option(1e-6, "KIP.ipynb: reg 1e-6 x tr(K_SS)/|S|")
        learn_labels: bool = option(False, "KIP: --learn_labels off by default")
        n_models: int = option(8, "RFAD: 8 random models")
        rf_width: int = option(256, "RFAD: width 256")
        lr_labels: float = option(2.0, "shared with MTT's soft labels (DATM --lr_y 2.0)")

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        ds = ctx.dataset
        self.input_shape = (ds.channels, *ds.image_size)
        self.kernel_name = ctx.config["kernel"]
        self.kernel = None
        if self.kernel_name in ("fc_ntk", "fc_nngp"):
            self.kernel = build_kernel(self.kernel_name, self.input_shape, depth=int(ctx.config["kernel_depth"]))
        elif self.kernel_name in ("conv_ntk", "conv_nngp"):
            self.kernel = build_kernel(self.kernel_name, self.input_shape, depth=int(ctx.config["conv_depth"]),
                                       conv_readout=ctx.config["conv_readout"])
        elif self.kernel_name == "rf_nngp":
            self.kernel = build_kernel(
                "rf_nngp", self.input_shape, n_models=int(ctx.config["n_models"]),
                network_factory=_random_convnet_factory(ds, int(ctx.config["rf_width"])),
            ).to(ctx.device)

    @classmethod
    def prepare_config(cls, config, dataset):
        check_choice(config["kernel"], KERNEL_NAMES, "kernel")
        check_choice(config["conv_readout"], CONV_READOUT_NAMES, "conv_readout")
        check_options(config, ("lr_labels",), integers=("kernel_depth", "conv_depth", "n_models", "rf_width"),
                      non_negative=("krr_reg",))
        if config["kernel"] == "empirical_ntk":
            net = build_isolated(lambda: get_network(config["arch"], dataset.channels, dataset.num_classes,
                                                     tuple(dataset.image_size)))
            kernel = build_kernel("empirical_ntk", (dataset.channels, *dataset.image_size), network=net.eval())
        elif config["kernel"] == "rf_nngp":
            kernel = build_kernel("rf_nngp", (dataset.channels, *dataset.image_size), n_models=1,
                                  network_factory=_random_convnet_factory(dataset, int(config["rf_width"])))
        elif config["kernel"] in ("conv_ntk", "conv_nngp"):
            try:
                kernel = build_kernel(config["kernel"], (dataset.channels, *dataset.image_size),
                                      depth=int(config["conv_depth"]), conv_readout=config["conv_readout"])
            except ValueError as error:
                raise ValueError(f"conv_depth={config['conv_depth']!r} does not fit images of size {tuple(dataset.image_size)}: {error}") from None
        else:
            kernel = build_kernel(config["kernel"], (dataset.channels, *dataset.image_size),
                                  depth=int(config["kernel_depth"]))
        probe = dataset.train_images[:2].float().reshape(2, -1)
        value = kernel(probe, probe)
        if tuple(value.shape) != (2, 2):
            raise ValueError(f"kernel {config['kernel']!r} returned shape {tuple(value.shape)} for 2 points")
        return config

    @classmethod
    def synthetic_extras(cls, images, labels, dataset, config):
        if not config["learn_labels"]:
            return None
        from ipmcondense.ipm.kernel_regression import centred_one_hot

        return SyntheticExtras(label_values=centred_one_hot(labels, dataset.num_classes),
                               lr_labels=float(config["lr_labels"]))

    def _support_labels(self) -> Tensor:
        from ipmcondense.ipm.kernel_regression import centred_one_hot

        syn = self.ctx.synthetic
        if getattr(syn, "label_values", None) is not None:
            return syn.label_values
        return centred_one_hot(syn.labels, self.ctx.dataset.num_classes, dtype=torch.float32)

    def _kernel_for_step(self) -> nn.Module:
        if self.kernel_name == "empirical_ntk":
            return build_kernel("empirical_ntk", self.input_shape, network=draw_network(self.ctx).eval())
        if self.kernel_name == "rf_nngp":
            self.kernel.resample(generator=self.ctx.generator)
        return self.kernel

    def _krr_options(self) -> dict[str, Any]:
        return {"reg": float(self.config["krr_reg"]), "loss": "mse"}

    def loss(self, networks):
        from ipmcondense.ipm.kernel_regression import krr_loss

        from ..parallel import WholeSetOnEveryRank

        ctx = self.ctx
        # class-parallel: the KRR is fitted on the whole S on every rank, scored on this rank's real rows
        whole = WholeSetOnEveryRank.of_context(ctx)
        kernel = self._kernel_for_step()
        n_real = int(self.config["batch_real"])
        real, real_labels = ctx.real_batches.sample(n_real)
        support = whole.rows(ctx.synthetic.images())
        labels = self._support_labels()
        if labels.requires_grad:  # learned label rows are exchanged like the image rows
            labels = whole.rows(labels)
        options = self._krr_options()
        if "log_temperature" in options:
            options["log_temperature"] = whole.shared(options["log_temperature"])
        value = krr_loss(
            kernel, support.reshape(support.shape[0], -1), labels,
            real.reshape(real.shape[0], -1), real_labels, **options,
        )
        return whole.share(value, real.shape[0], n_real)


class RandomFeatureKRRObjective(KernelInducingPointsObjective):
    r"""RFAD: KRR with the random-feature NNGP of ``n_models`` random ConvNets and a Platt-scaled CE (Loo et al. 2022).

    Kernel :math:`k(x, x') = 2\langle\phi(x), \phi(x')\rangle + 0.01` with :math:`\phi` the concatenated,
    :math:`1/\sqrt{M d}`-scaled embeddings of ``n_models`` no-norm ConvNets of width ``rf_width`` with
    NNGP initialisation, drawn afresh every step from the run's generator; ridge ``krr_reg``
    (relative, 5e-3); loss :math:`\mathrm{CE}(e^{\tau}\hat Y_T, y_T)` with a learnable log-temperature
    :math:`\tau` (init 0, SGD step ``lr_temperature``).

    **Relation to an IPM**: none (as KIP); the kernel is the one whose MMD DM estimates.
    Cost: ``n_models`` forward passes on :math:`|S| + |T|` images + an :math:`O(|S|^3)` solve.
    """

    name = "rfad"
    relation_to_ipm = "not an IPM: KRR (Platt-scaled CE) with a random-feature NNGP kernel"

    @dataclass(frozen=True)
    class Options(KernelInducingPointsObjective.Options):
        lr_temperature: float = option(0.01, "RFAD: Platt temperature learned with the images")

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.log_temperature = nn.Parameter(torch.zeros((), dtype=torch.float64, device=ctx.device))

    @classmethod
    def prepare_config(cls, config, dataset):
        config = super().prepare_config(config, dataset)
        check_options(config, ("lr_temperature",))
        return config

    def parameter_groups(self):
        return [{"params": [self.log_temperature], "lr": float(self.config["lr_temperature"])}]

    def _krr_options(self):
        return {"reg": float(self.config["krr_reg"]), "loss": "platt", "log_temperature": self.log_temperature}

    def state_dict(self):
        return {"log_temperature": self.log_temperature.detach().cpu().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])
