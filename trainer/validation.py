"""Validation loss: the objective's loss on images held out of training, at fixed timesteps with
fixed noise, so one evaluation compares with the next and only the model's change moves it.

Training loss keeps falling while a LoRA memorises its images; the loss on images it never saw
stops falling and rises when it overfits, which is what the guide asks users to catch. The same
timesteps are spread evenly over the range training draws from (σ for flow models).
"""

from __future__ import annotations

import torch

from .examples import TrainingSet
from .families.base import LoadedModel
from .objectives import apply_noise, fixed_timesteps
from .precision import autocast_for
from .previews import evaluating

TIMESTEPS_PER_IMAGE = 8
NOISE_SEED = 20260421  # any fixed number: the noise must be the same at every evaluation


class ValidationLoss:
    def __init__(self, model: LoadedModel, examples: TrainingSet, compute_dtype: torch.dtype, batch_size: int,
                 flow_shift: float = 0.0) -> None:
        self.model, self.compute_dtype, self.batch_size = model, compute_dtype, batch_size
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.cases = []  # (latents, conditioning, noise, timesteps) per held-out image
        for index in range(len(examples.examples)):
            with torch.no_grad():
                latents, conditioning = examples.batch([index], torch.float32)
            timesteps = fixed_timesteps(TIMESTEPS_PER_IMAGE, model.noise_scheduler, model.prediction_type,
                                        model.flow_shift(tuple(latents.shape[-2:]), flow_shift))
            noise = torch.randn((TIMESTEPS_PER_IMAGE, *latents.shape[1:]), generator=generator)
            self.cases.append((latents.cpu(), {k: v.cpu() for k, v in conditioning.items()}, noise, timesteps))

    def __len__(self) -> int:
        return len(self.cases)

    def __call__(self) -> float:
        """The mean squared error over every held-out image and fixed timestep."""
        model, device, total, count = self.model, self.model.device, 0.0, 0
        with evaluating(model):
            for latents, conditioning, noise, timesteps in self.cases:
                for start in range(0, len(timesteps), self.batch_size):
                    chunk = timesteps[start:start + self.batch_size].to(device)
                    size = len(chunk)
                    clean = latents.to(device).expand(size, *latents.shape[1:])
                    noisy, target = apply_noise(clean, noise[start:start + size].to(device), chunk,
                                                model.noise_scheduler, model.prediction_type)
                    rows = {k: v.to(device, self.compute_dtype).expand(size, *v.shape[1:])
                            for k, v in conditioning.items()}
                    with autocast_for(device, self.compute_dtype):
                        prediction = model.family.predict(model, noisy.to(self.compute_dtype), chunk, rows)
                    total += (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1).sum().item()
                    count += size
        return total / max(1, count)
