"""Multi-layer perceptron on flattened images (the reference ``MLP``: 128-128 hidden, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ipmcondense.nets._common import check_geometry, check_images, make_activation

__all__ = ["MLP"]


class MLP(nn.Module):
    r"""Fully connected network on the flattened image.

    :math:`h_0 = \mathrm{vec}(x) \in \mathbb{R}^{C H W}`,
    :math:`h_\ell = \sigma(W_\ell h_{\ell-1} + b_\ell)`; ``embed`` is the last hidden layer and the
    classifier is one ``nn.Linear``. The reference uses hidden widths ``(128, 128)`` and ReLU; the
    input dimension is taken from the input (``C*H*W``), so any image size works.

    Args:
        channels, num_classes, image_size: input geometry and number of classes.
        hidden: widths of the hidden layers (at least one).
        activation: ``"relu"``, ``"leakyrelu"``, ``"sigmoid"`` or ``"swish"``.

    Cost: :math:`O(B \sum_\ell d_{\ell-1} d_\ell)` multiply-adds.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        *,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        channels, num_classes, image_size = check_geometry(channels, num_classes, image_size)
        hidden = tuple(hidden)
        if not hidden or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden
        ):
            raise ValueError(
                f"hidden must be a non-empty sequence of positive integers, got {hidden!r}"
            )
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = image_size
        widths = (channels * image_size[0] * image_size[1], *hidden)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_out), make_activation(activation))
            for d_in, d_out in zip(widths[:-1], widths[1:])
        )
        self.feature_dim: int = hidden[-1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def layer_features(self, x: Tensor) -> list[Tensor]:
        """Activation of every hidden layer: ``len(hidden)`` tensors ``(B, width)``."""
        h = check_images(x, self.channels, self.image_size).flatten(-3)
        outputs = []
        for layer in self.layers:
            h = layer(h)
            outputs.append(h)
        return outputs

    def embed(self, x: Tensor) -> Tensor:
        """Last hidden layer: ``(B, feature_dim)``."""
        h = check_images(x, self.channels, self.image_size).flatten(-3)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` = ``classifier(embed(x))``."""
        return self.classifier(self.embed(x))
