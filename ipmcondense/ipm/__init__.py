"""The mathematics: integral probability metrics between point clouds, independent of condensation.

Every function takes two point clouds (tensors or arrays of shape ``(n, d)``; images are flattened),
optional probability weights, and returns a differentiable 0-d tensor. Nothing here imports the
higher layers of the package (networks, condensation, data).
"""

from .critic import NeuralIPM, NeuralIPMResult, gradient_penalty, neural_ipm
from .dataset_distance import distance, otdd
from .kernel_regression import centred_one_hot, kernel_ridge_predict, krr_loss
from .kernels import (
    EnergyKernel,
    GaussianKernel,
    InverseMultiquadricKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    MixtureKernel,
    PolynomialKernel,
    get_kernel,
    median_bandwidth,
)
from .loss import IPMLoss
from .mean_embedding import mean_embedding_distance, mean_embedding_witness
from .mmd import energy_distance, mmd, mmd2, mmd2_from_kernel_matrix, mmd_witness
from .neural_kernels import (
    EmpiricalNTK,
    FullyConnectedNNGP,
    FullyConnectedNTK,
    RandomFeatureNNGP,
    empirical_ntk,
)
from .sinkhorn import sinkhorn_divergence, sinkhorn_witness
from .two_sample import TwoSampleTestResult, two_sample_test
from .wasserstein import (
    free_support_barycenter,
    max_sliced_wasserstein,
    sliced_wasserstein,
    transport_plan,
    wasserstein,
    wasserstein_1d,
)
from .witness import Witness

__all__ = [
    # kernels
    "Kernel",
    "GaussianKernel",
    "LaplacianKernel",
    "InverseMultiquadricKernel",
    "EnergyKernel",
    "LinearKernel",
    "PolynomialKernel",
    "MixtureKernel",
    "get_kernel",
    "median_bandwidth",
    "FullyConnectedNNGP",
    "FullyConnectedNTK",
    "EmpiricalNTK",
    "RandomFeatureNNGP",
    "empirical_ntk",
    # distances
    "mmd2",
    "mmd",
    "mmd2_from_kernel_matrix",
    "energy_distance",
    "wasserstein",
    "wasserstein_1d",
    "free_support_barycenter",
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "transport_plan",
    "sinkhorn_divergence",
    "mean_embedding_distance",
    "NeuralIPM",
    "NeuralIPMResult",
    "neural_ipm",
    "gradient_penalty",
    "distance",
    "otdd",
    # witnesses, tests, losses
    "Witness",
    "mmd_witness",
    "mean_embedding_witness",
    "sinkhorn_witness",
    "two_sample_test",
    "TwoSampleTestResult",
    "IPMLoss",
    "kernel_ridge_predict",
    "krr_loss",
    "centred_one_hot",
]
