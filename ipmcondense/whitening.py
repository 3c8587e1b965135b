"""ZCA whitening of images (MTT, KIP and RFAD condense and evaluate in the whitened space of the real data)."""

from __future__ import annotations

import torch
from torch import Tensor

from ipmcondense.ipm._validation import check_positive

__all__ = ["ZCAWhitening", "DatasetWhitening"]


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


class DatasetWhitening:
    r"""ZCA whitening of a dataset's images as MTT, KIP, RFAD and RCIG fit it: in pixel scale.

    The references whiten the raw pixels in :math:`[0, 1]` (MTT ``utils.py: get_dataset`` drops the
    per-channel ``Normalize`` when ``--zca`` is given and fits ``K.enhance.ZCAWhitening(eps=0.1)`` on
    the full training set; RFAD ``get_zca_matrix(X_train, reg_coef=0.1)``). The library's datasets are
    stored normalised (:math:`x = (p - m_c) / s_c` per channel), so this class undoes the
    normalisation first:

    .. math::
        z = \big(p(x) - \mu\big) W, \qquad p(x) = x\, s_c + m_c,

    with :math:`\mu` and :math:`W` of :class:`ZCAWhitening` fitted on :math:`p` of **every**
    training image. The whitened training set then has covariance
    :math:`U \Lambda (\Lambda + \varepsilon I)^{-1} U^T` (identity on the directions whose
    variance is much larger than :math:`\varepsilon`). Whitening is a fixed affine map, so the
    same transform is applied to the test set at evaluation time.

    Args:
        dataset: a :class:`~ipmcondense.data.LabelledImages` (its ``train_images`` are used).
        eps: the regulariser added to the eigenvalues (0.1 as the references).

    Cost: as :meth:`ZCAWhitening.fit` on the ``N`` training images, :math:`O(N D^2 + D^3)`.
    """

    def __init__(self, dataset, eps: float = 0.1) -> None:
        self.eps = check_positive(eps, "eps")
        self.dataset_name = str(dataset.name)
        self.channel_mean = tuple(float(v) for v in dataset.mean)
        self.channel_std = tuple(float(v) for v in dataset.std)
        self.zca = ZCAWhitening(eps).fit(self._denormalise(dataset.train_images.detach().cpu().double()))

    def _denormalise(self, images: Tensor) -> Tensor:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.channel_mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.channel_std, dtype=images.dtype, device=images.device).view(shape)
        return images * std + mean

    def transform(self, images: Tensor) -> Tensor:
        """Whiten normalised ``images`` ``(n, C, H, W)`` (same dtype and device); differentiable."""
        return self.zca.transform(self._denormalise(images))

    def to_pixels(self, whitened: Tensor) -> Tensor:
        """Undo the whitening: images in pixel scale :math:`[0, 1]` (for pictures of a whitened set)."""
        return self.zca.inverse_transform(whitened)

    def whitened_dataset(self, dataset):
        """A copy of ``dataset`` whose training and test images are whitened.

        Its ``mean`` and ``std`` are 0 and 1 (its ``denormalise`` is the identity: use
        :meth:`to_pixels` for pictures); name, labels and class names are kept, so the DSA strategy
        and the expert-buffer checks see the same dataset.
        """
        from ipmcondense.data import LabelledImages

        if str(dataset.name) != self.dataset_name:
            raise ValueError(f"this whitening was fitted on {self.dataset_name!r}, got dataset {dataset.name!r}")
        channels = int(dataset.train_images.shape[1])
        with torch.no_grad():
            train = self.transform(dataset.train_images.detach())
            test = self.transform(dataset.test_images.detach())
        return LabelledImages(
            name=dataset.name, train_images=train, train_labels=dataset.train_labels, test_images=test,
            test_labels=dataset.test_labels, num_classes=dataset.num_classes, mean=(0.0,) * channels,
            std=(1.0,) * channels, class_names=dataset.class_names,
        )
