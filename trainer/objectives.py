"""The diffusion training objective, written once for every family: how clean latents are noised,
what the denoiser must predict, and how each sample's loss is weighted.

- epsilon / v_prediction (SD 1.5, SDXL): DDPM noising at a uniformly drawn timestep.
- flow (FLUX.1, Z-Image, FLUX.2): rectified flow, x_t = (1 - σ) x + σ ε, predict ε - x. σ is drawn as a shifted
  sigmoid of a standard normal ("shifted logit-normal"): σ = s·u / (1 + (s - 1)·u), u = sigmoid(n).
  The shift s is the model's own (its family's `flow_shift`: the shift its scheduler samples
  with at the image's token count), so training spends its steps on the noise levels inference
  visits, unless the flow_shift setting gives another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor  # per-sample loss weights, shape (B,)


def make_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise; a noise offset adds a per-channel constant so the model can learn very
    dark or bright images."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(latents.device, latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def apply_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler,
                prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latents, target) for given noise and timesteps (σ in [0, 1] for flow)."""
    if prediction_type == "flow":
        view = timesteps.to(latents.device, latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return (1 - view) * latents + view * noise, noise - latents
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        return noisy, noise
    if prediction_type == "v_prediction":
        return noisy, scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"apply_noise handles epsilon, v_prediction and flow, not {prediction_type}")


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ from u in (0, 1) under the timestep shift (see the module docstring)."""
    return shift * u / (1 + (shift - 1) * u)


def noise_batch(latents: torch.Tensor, scheduler, prediction_type: str, generator: torch.Generator,
                noise_offset: float = 0.0, min_snr_gamma: float = 0.0, flow_shift: float = 1.0) -> NoisedBatch:
    """Noise a batch of clean latents for the model's objective, drawing noise and timesteps (for
    flow, σ under `flow_shift`)."""
    noise = make_noise(latents, generator, noise_offset)
    weights = torch.ones(latents.shape[0], device=latents.device)
    if prediction_type == "flow":
        u = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))
        timesteps = flow_sigmas(u, flow_shift).to(latents.device, latents.dtype)
    else:
        count = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator).to(latents.device)
        if min_snr_gamma:
            weights = min_snr_weights(scheduler, timesteps, min_snr_gamma, prediction_type).to(latents.device)
    noisy, target = apply_noise(latents, noise, timesteps, scheduler, prediction_type)
    return NoisedBatch(noisy, timesteps, target, weights)


def fixed_timesteps(count: int, scheduler, prediction_type: str, flow_shift: float = 1.0) -> torch.Tensor:
    """`count` timesteps spread evenly over the range training draws from (σ for flow), for
    measurements that must compare from one evaluation to the next."""
    u = (torch.arange(count, dtype=torch.float32) + 0.5) / count
    if prediction_type == "flow":
        return flow_sigmas(u, flow_shift)
    return (u * scheduler.config.num_train_timesteps).long().clamp(max=scheduler.config.num_train_timesteps - 1)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                 spatial: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, weighted, averaged over the batch (computed in fp32). With
    `spatial` weights (masked loss: (B, 1, h, w) at the latent grid) each sample's error is their
    weighted mean, so a small mask trains as strongly as a large one and a latent of weight 0 adds
    nothing (not even to the gradient)."""
    squared = (prediction.float() - target.float()).pow(2)
    if spatial is None:
        per_sample = squared.flatten(1).mean(dim=1)
    else:
        spatial = spatial.float().expand_as(squared)
        per_sample = (squared * spatial).flatten(1).sum(dim=1) / spatial.flatten(1).sum(dim=1).clamp_min(1e-8)
    return (per_sample * weights).mean()
