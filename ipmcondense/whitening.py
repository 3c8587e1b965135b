"""ZCA whitening of images (MTT, KIP and RFAD condense and evaluate in the whitened space of the real data)."""

from __future__ import annotations

import torch
from torch import Tensor

from ipmcondense.ipm._validation import check_positive

__all__ = ["ZCAWhitening"]


class ZCAWhitening:
    """ZCA whitening :math:`x \\mapsto (x - \\mu) W`, :math:`W = U (\\Lambda + \\varepsilon I)^{-1/2} U^T`.

    :math:`\\mu` and :math:`\\Sigma = U \\Lambda U^T` are the mean and the unbiased covariance
    (divisor :math:`N - 1`) of the flattened training images, as ``kornia.enhance.ZCAWhitening``
    used by MTT (``eps=0.1``). :math:`W` is symmetric, so whitened images stay close to the
    originals in appearance. Fitting costs :math:`O(N D^2 + D^3)` time and :math:`O(D^2)` memory for
    :math:`D = C H W` (in float64); applying costs :math:`O(N D^2)`.

    Args:
        eps: regulariser added to the eigenvalues (0.1).
    """

    def __init__(self, eps: float = 0.1) -> None:
        self.eps = check_positive(eps, "eps")
        self.mean: Tensor | None = None
        self.whitening: Tensor | None = None
        self.colouring: Tensor | None = None

    def fit(self, images: Tensor) -> "ZCAWhitening":
        """Fit the mean and the whitening matrix on ``images`` ``(N, ...)``, ``N >= 2``."""
        if not isinstance(images, Tensor) or images.dim() < 2:
            raise ValueError("images must be a tensor of shape (N, ...) with N >= 2")
        if images.shape[0] < 2:
            raise ValueError(f"images must hold at least 2 samples to fit ZCA, got {images.shape[0]}")
        flat = images.detach().reshape(images.shape[0], -1).to(torch.float64)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("images contains NaN or inf values")
        mean = flat.mean(dim=0)
        centred = flat - mean
        covariance = centred.T @ centred / (flat.shape[0] - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp(min=0.0) + self.eps
        self.mean = mean
        self.whitening = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
        self.colouring = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
        return self

    def _check_fitted(self, x: Tensor) -> None:
        if self.mean is None:
            raise ValueError("ZCAWhitening must be fitted first: call .fit(train_images)")
        if x[0].numel() != self.mean.numel():
            raise ValueError(
                f"images have {x[0].numel()} values per sample but ZCA was fitted on {self.mean.numel()}"
            )

    def transform(self, x: Tensor) -> Tensor:
        """Whiten ``x`` (same shape, dtype and device as ``x``); differentiable in ``x``."""
        self._check_fitted(x)
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        whitening = self.whitening.to(device=x.device, dtype=x.dtype)
        return ((x.reshape(x.shape[0], -1) - mean) @ whitening).reshape(x.shape)

    def inverse_transform(self, x: Tensor) -> Tensor:
        """Undo :meth:`transform`: :math:`z \\mapsto z W^{-1} + \\mu`."""
        self._check_fitted(x)
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        colouring = self.colouring.to(device=x.device, dtype=x.dtype)
        return (x.reshape(x.shape[0], -1) @ colouring + mean).reshape(x.shape)

    __call__ = transform
