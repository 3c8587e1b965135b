"""Helpers shared by the subcommands."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | None, option: str = "--device") -> torch.device | None:
    """``None`` or a usable ``torch.device``; a malformed or unavailable one is a ``ValueError`` naming ``option``."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{option} {device!r} is not a torch device; expected cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{option} {device!r}: expected cpu, cuda, cuda:N or mps")
    return dev
