r"""A small class-conditional DDPM (Ho et al. 2020) sized to the dataset's images (8x8 digits, 28x28, 32x32).

**Forward process.** With a noise schedule :math:`\beta_1 .. \beta_T` (:class:`NoiseSchedule`: ``"linear"``,
:math:`\beta_t` from 1e-4 to 0.02, Ho et al.; or ``"cosine"``, Nichol & Dhariwal 2021, :math:`s = 0.008`,
:math:`\beta_t \le 0.999`), :math:`\alpha_t = 1 - \beta_t` and :math:`\bar\alpha_t = \prod_{s \le t} \alpha_s`,

.. math:: q(x_t \mid x_0) = N\big(\sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big),
    \qquad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon
    \quad (:func:`q_sample`).

The model works in the pixel space scaled to :math:`[-1, 1]` (``x = 2 p - 1`` for pixels ``p`` in [0, 1]); the
generator's inputs and outputs are in the dataset's normalised space like every other part of the library.

**Model.** :class:`ConditionalUNet` predicts the noise :math:`\varepsilon_\theta(x_t, t, y)`: a U-Net with
residual blocks (group norm, SiLU, 3x3 convolutions), one or two 2x down-samplings (as many as keep a side
even and at least 4: 8x8 -> 4x4; 28 -> 14 -> 7; 32 -> 16 -> 8), skip connections, and a sinusoidal time
embedding plus a learned class embedding added in every block. The class table has one extra row, the *null*
class, for classifier-free guidance (Ho & Salimans 2022): training replaces a label by the null class with
probability ``class_dropout``, and sampling uses
:math:`\hat\varepsilon = \varepsilon_\theta(x, t, \varnothing) + w\,(\varepsilon_\theta(x, t, y) - \varepsilon_\theta(x, t, \varnothing))`
(``guidance`` :math:`w`; :math:`w = 1` is the plain conditional model, one network pass per step).

**Loss** (:func:`epsilon_loss`): :math:`\mathbb E_{t, x_0, \varepsilon} \|\varepsilon - \varepsilon_\theta(x_t, t, y)\|^2`
averaged over pixels, :math:`t` uniform on :math:`\{0, .., T-1\}` (0-based).

**Samplers.** :func:`ddpm_sample`: the ancestral chain over all :math:`T` steps,
:math:`x_{t-1} = \tilde\mu_t(x_t, \hat x_0) + \tilde\sigma_t z` with the posterior mean and variance
:math:`\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`; :func:`ddim_sample` (Song et al.
2021): a strided sub-sequence of ``steps`` time steps,
:math:`x_{s} = \sqrt{\bar\alpha_s}\, \hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\, \hat\varepsilon + \sigma z`,
:math:`\sigma = \eta \sqrt{(1 - \bar\alpha_s)/(1 - \bar\alpha_t)}\sqrt{1 - \bar\alpha_t / \bar\alpha_s}`;
:math:`\eta = 0` is deterministic, :math:`\eta = 1` with every step is the ancestral chain. Both clip
:math:`\hat x_0` to [-1, 1] and recompute :math:`\hat\varepsilon` from it.

:class:`DiffusionGenerator` wraps the model as a *generator* in this library's sense: ``latent_dim = C*H*W``
and ``G(z, y)`` is the deterministic DDIM sample (``sample_steps`` steps, :math:`\eta = 0`) started from
:math:`x_T = z`, so ``evaluate DIR --ipc`` and ``--synthetic latent`` work with it unchanged. Cost of one
sample: ``sample_steps`` U-Net passes (two per step with guidance :math:`w \ne 1`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipmcondense.ipm._validation import check_choice, check_positive_int, check_positive_number

__all__ = [
    "NOISE_SCHEDULES",
    "NoiseSchedule",
    "q_sample",
    "ConditionalUNet",
    "DiffusionGenerator",
    "epsilon_loss",
    "ddpm_sample",
    "ddim_sample",
    "ddim_timesteps",
    "predict_x0",
    "timestep_embedding",
]

NOISE_SCHEDULES = ("linear", "cosine")


class NoiseSchedule(nn.Module):
    r"""The betas and cumulative products :math:`\bar\alpha_t` (module docstring) as float32 buffers of length ``T``.

    Computed in float64 and rounded once, so a model saved and reloaded sees the same numbers.
    """

    def __init__(self, timesteps: int = 1000, kind: str = "linear") -> None:
        super().__init__()
        self.timesteps = check_positive_int(timesteps, "timesteps")
        self.kind = check_choice(kind, NOISE_SCHEDULES, "schedule")
        if kind == "linear":
            scale = 1000.0 / timesteps  # Ho et al.'s 1e-4 .. 0.02 at T = 1000, rescaled as improved-DDPM does
            betas = torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), timesteps, dtype=torch.float64)
        else:
            s = 0.008
            steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    r""":math:`x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon`: a draw of :math:`q(x_t \mid x_0)`."""
    a = _gather(schedule.alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    r""":math:`\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\, \hat\varepsilon) / \sqrt{\bar\alpha_t}`."""
    a = _gather(schedule.alphas_cumprod, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _downsamplings(image_size: Sequence[int]) -> int:
    h, w = (int(v) for v in image_size)
    k = 0
    while k < 2 and h % 2 == 0 and w % 2 == 0 and h // 2 >= 4 and w // 2 >= 4:
        h, w, k = h // 2, w // 2, k + 1
    return k


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    r"""Sinusoidal embedding :math:`[\cos(t f_i), \sin(t f_i)]`, :math:`f_i = 10000^{-i/(d/2)}` (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class ConditionalUNet(nn.Module):
    r""":math:`\varepsilon_\theta(x_t, t, y)`: ``(B, C, H, W), (B,), (B,) -> (B, C, H, W)`` (module docstring).

    Labels are ``0 .. num_classes - 1``, or ``num_classes`` for the null class. Channel widths per level
    ``width * (1, 2, 2)[:levels]``. Cost: ``O(B * width^2 * H * W)`` per pass.
    """

    def __init__(self, num_classes: int, channels: int, image_size: Sequence[int], width: int = 32) -> None:
        super().__init__()
        for value, name in ((num_classes, "num_classes"), (channels, "channels"), (width, "width")):
            check_positive_int(value, name)
        self.num_classes, self.width = num_classes, width
        levels = _downsamplings(image_size) + 1
        widths = [width * m for m in (1, 2, 2)[:levels]]
        emb_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = width
        for i, w in enumerate(widths):
            self.down.append(_ResBlock(prev, w, emb_dim))
            prev = w
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([_ResBlock(prev, prev, emb_dim), _ResBlock(prev, prev, emb_dim)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(levels)):
            self.up.append(_ResBlock(prev + widths[i], widths[i], emb_dim))
            prev = widths[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(widths[i], widths[i - 1], 3, padding=1))
                prev = widths[i - 1]
        self.out_norm = nn.GroupNorm(_groups(prev), prev)
        self.out = nn.Conv2d(prev, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width)) + self.class_embedding(labels.long())
        h = self.inp(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        for block in self.mid:
            h = block(h, emb)
        for j, block in enumerate(self.up):
            skip = skips.pop()
            h = block(torch.cat([h, skip], dim=1), emb)
            if j < len(self.upsample):
                target = skips[-1].shape[-2:]
                h = self.upsample[j](F.interpolate(h, size=target, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


class DiffusionGenerator(nn.Module):
    r"""A class-conditional DDPM as a generator ``G(z, y)`` (module docstring): outputs normalised images.

    Args:
        num_classes, channels, image_size: the data.
        width: U-Net base width.
        timesteps: :math:`T`.
        schedule: ``"linear"`` or ``"cosine"``.
        sample_steps: DDIM steps of :meth:`forward`.
        guidance: classifier-free guidance weight :math:`w` of sampling (1: none).
        mean, std: the dataset's per-channel normalisation (pixel scale [0, 1]).
    """

    def __init__(self, num_classes: int, channels: int, image_size: Sequence[int], width: int = 32,
                 timesteps: int = 1000, schedule: str = "linear", sample_steps: int = 25, guidance: float = 1.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.image_size = tuple(int(v) for v in image_size)
        self.num_classes, self.channels = check_positive_int(num_classes, "num_classes"), channels
        self.unet = ConditionalUNet(num_classes, channels, self.image_size, width)
        self.schedule = NoiseSchedule(timesteps, schedule)
        self.sample_steps = check_positive_int(sample_steps, "sample_steps")
        if self.sample_steps > timesteps:
            raise ValueError(f"sample_steps ({sample_steps}) cannot exceed timesteps ({timesteps})")
        self.guidance = check_positive_number(guidance, "guidance", allow_zero=True)
        self.latent_dim = channels * self.image_size[0] * self.image_size[1]
        mean = [0.0] * channels if mean is None else [float(v) for v in mean]
        std = [1.0] * channels if std is None else [float(v) for v in std]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean and std need {channels} values each (std positive), got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def architecture(self) -> dict:
        """The constructor's arguments (what :func:`ipmcondense.generators.load_generator` rebuilds from)."""
        return {"num_classes": self.num_classes, "channels": self.channels, "image_size": list(self.image_size),
                "width": self.unet.width, "timesteps": self.schedule.timesteps, "schedule": self.schedule.kind,
                "sample_steps": self.sample_steps, "guidance": self.guidance,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def to_model_space(self, images: Tensor) -> Tensor:
        """Normalised images to the model's [-1, 1] pixel scale."""
        return 2 * (images * self.std + self.mean) - 1

    def from_model_space(self, x: Tensor) -> Tensor:
        """The model's [-1, 1] scale back to normalised images."""
        return ((x + 1) / 2 - self.mean) / self.std

    def guided_eps(self, x: Tensor, t: Tensor, labels: Tensor, guidance: float | None = None) -> Tensor:
        """The guided noise prediction of the module docstring (one pass when the weight is 1)."""
        w = self.guidance if guidance is None else guidance
        eps = self.unet(x, t, labels)
        if w == 1.0:
            return eps
        unconditional = self.unet(x, t, torch.full_like(labels, self.num_classes))
        return unconditional + w * (eps - unconditional)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape ({z.shape[0]},) to match z, got {tuple(labels.shape)}")
        noise = z.view(z.shape[0], self.channels, *self.image_size)
        return self.from_model_space(ddim_sample(self, labels, noise, self.sample_steps, eta=0.0))


def epsilon_loss(model: DiffusionGenerator, x0: Tensor, labels: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-sample :math:`\mathrm{mean}_{pixels}(\varepsilon - \varepsilon_\theta(x_t, t, y))^2` and the predicted
    :math:`\hat x_0` (unclipped, the embedding of minimax diffusion); ``x0`` in the model's [-1, 1] scale."""
    x_t = q_sample(model.schedule, x0, t, noise)
    eps = model.unet(x_t, t, labels)
    return (noise - eps).pow(2).flatten(1).mean(dim=1), predict_x0(model.schedule, x_t, t, eps)


def _step_noise(rng: torch.Generator | None, like: Tensor) -> Tensor:
    return torch.randn(like.shape, generator=rng).to(like.device, like.dtype)


@torch.no_grad()
def ddpm_sample(model: DiffusionGenerator, labels: Tensor, noise: Tensor, rng: torch.Generator | None = None,
                guidance: float | None = None) -> Tensor:
    """The ancestral sampler over all ``T`` steps from ``x_T = noise`` (model scale [-1, 1]); draws from ``rng``."""
    s = model.schedule
    betas, abar = s.betas.to(noise.device), s.alphas_cumprod.to(noise.device)
    x = noise
    for t in range(s.timesteps - 1, -1, -1):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = predict_x0(s, x, tt, model.guided_eps(x, tt, labels, guidance)).clamp(-1, 1)
        a_prev = abar[t - 1] if t > 0 else torch.ones((), device=x.device)
        mean = (betas[t] * a_prev.sqrt() / (1 - abar[t])) * x0 + ((1 - a_prev) * (1 - betas[t]).sqrt() / (1 - abar[t])) * x
        if t > 0:
            var = betas[t] * (1 - a_prev) / (1 - abar[t])
            mean = mean + var.sqrt() * _step_noise(rng, x)
        x = mean
    return x


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The ``steps`` time steps DDIM visits, descending: ``round(linspace(T-1, 0, steps))`` (every step when equal)."""
    return [int(v) for v in torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive()]


def ddim_sample(model: DiffusionGenerator, labels: Tensor, noise: Tensor, steps: int, *, eta: float = 0.0,
                rng: torch.Generator | None = None, guidance: float | None = None) -> Tensor:
    """DDIM from ``x_T = noise`` over :func:`ddim_timesteps` (model scale); differentiable (no ``no_grad``) so a
    latent-space row can back-propagate through it; ``eta > 0`` draws its noise from ``rng``."""
    s = model.schedule
    abar = s.alphas_cumprod.to(noise.device)
    ts = ddim_timesteps(s.timesteps, steps)
    x = noise
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = predict_x0(s, x, tt, model.guided_eps(x, tt, labels, guidance)).clamp(-1, 1)
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=x.device)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * _step_noise(rng, x)
    return x
