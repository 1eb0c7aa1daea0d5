"""The diffusion training objective, written once for every family: how clean latents are noised,
what the denoiser must predict, and how each sample's loss is weighted.

- epsilon / v_prediction (SD 1.5, SDXL): DDPM noising at a uniformly drawn timestep.
- flow (FLUX): rectified flow, x_t = (1 - t) x + t ε, predict ε - x (set up in the FLUX issue).
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


def noise_batch(latents: torch.Tensor, scheduler, prediction_type: str, generator: torch.Generator,
                noise_offset: float = 0.0, min_snr_gamma: float = 0.0) -> NoisedBatch:
    """Noise a batch of clean latents for the DDPM objectives (epsilon, v_prediction)."""
    noise = make_noise(latents, generator, noise_offset)
    count = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"noise_batch handles epsilon and v_prediction, not {prediction_type}")
    weights = torch.ones(latents.shape[0], device=latents.device)
    if min_snr_gamma:
        weights = min_snr_weights(scheduler, timesteps, min_snr_gamma, prediction_type).to(latents.device)
    return NoisedBatch(noisy, timesteps, target, weights)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, weighted, averaged over the batch (computed in fp32)."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (per_sample * weights).mean()
