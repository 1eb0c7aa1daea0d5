"""Sample images while training, from the model being trained (its LoRA at strength 1): the same
prompts, seed and size each time, so one set compares with the next.

One sampler for every family and for both kinds of encoders (the model's own, or a ComfyUI
graph's): Euler steps over the denoiser with the family's own prediction, classifier-free guidance
(or, for guidance-distilled models, the guidance value the model takes), and the encoders' decoder.
Prompts are encoded once, when the sampler is made (at each sample where the text encoder trains).
Sampling never disturbs training: it runs without gradients, in eval mode, and puts the random
number generators back as they were, so a run with samples trains exactly as one without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image

from .families.base import LoadedModel
from .precision import autocast_for


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Whatever random numbers the block draws, the global generators continue afterwards as if
    it had not run."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def evaluating(model: LoadedModel) -> Iterator[None]:
    """Eval mode, no gradients and untouched RNGs for a measurement in the middle of training."""
    was_training = model.denoiser.training
    model.denoiser.eval()
    try:
        with torch.no_grad(), preserved_rng():
            yield
    finally:
        model.denoiser.train(was_training)


class PreviewSampler:
    def __init__(self, model: LoadedModel, prompts: Sequence[str], size: tuple[int, int], steps: int,
                 guidance_scale: float, seed: int, compute_dtype: torch.dtype, negative: str = "",
                 encode: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                 text_trained: bool = False) -> None:
        """`encode` encodes prompts (the model's encoders by default; the training set's, to reuse its
        cache); with `text_trained` the prompts are encoded again at each sample, through the text
        encoder's LoRA as it is then."""
        self.model, self.prompts, self.size, self.steps = model, list(prompts), size, steps
        self.compute_dtype = compute_dtype
        self.guidance_scale, self.seed = guidance_scale, seed
        self.classifier_free = model.family.uses_classifier_free_guidance(model)
        # Only classifier-free guidance reads the negative: a guidance-distilled model's is never encoded.
        self.negative = negative if self.classifier_free and guidance_scale != 1 else None
        self.encode = encode or model.encoders.encode_prompts
        self.text_trained = text_trained
        self._encode_prompts()

    def _encode_prompts(self) -> None:
        texts = self.prompts if self.negative is None else [*self.prompts, self.negative]
        with torch.no_grad():
            encoded = self.encode(texts)
        rows = {key: value.detach().float().cpu() for key, value in encoded.items()}
        width, height = self.size
        extra = self.model.family.image_conditioning((height, width), (0, 0), (height, width))
        rows.update({key: value[None].float().expand(len(texts), *value.shape) for key, value in extra.items()})
        # The prompts' rows, then the negative's: a batch of prompts is a slice of the first.
        self.prompt_rows = {key: value[:len(self.prompts)] for key, value in rows.items()}
        self.negative_row = {key: value[len(self.prompts):] for key, value in rows.items()}

    def _scheduler(self, latent_size: tuple[int, int]) -> tuple[object, torch.Tensor]:
        config = self.model.noise_scheduler.config
        if self.model.prediction_type == "flow":
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            dynamic = scheduler.config.get("use_dynamic_shifting")
            mu = self.model.family.sampling_mu(self.model, latent_size, self.steps) if dynamic else None
            scheduler.set_timesteps(self.steps, mu=mu)
        else:
            scheduler = EulerDiscreteScheduler.from_config(config, prediction_type=self.model.prediction_type)
            scheduler.set_timesteps(self.steps)
        return scheduler, scheduler.timesteps

    def _predict(self, latents: torch.Tensor, timestep: torch.Tensor, row: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> torch.Tensor:
        model = self.model
        device = model.device
        conditioning = {key: value.to(device, dtype) for key, value in row.items()}
        # Flow models take σ in [0, 1]; the scheduler counts it in thousandths.
        step = timestep / 1000 if model.prediction_type == "flow" else timestep
        with autocast_for(device, self.compute_dtype):
            return model.family.predict(model, latents.to(dtype), step.expand(latents.shape[0]).to(device),
                                        conditioning).float()

    def sample(self) -> list[Image.Image]:
        """One image per prompt. On a CPU all prompts go through the denoiser together, where a
        call's fixed cost outweighs its size; on a GPU one prompt at a time (with its negative),
        so sampling in the middle of training needs memory for a batch of two at most."""
        model = self.model
        width, height = self.size
        factor = model.encoders.pixels_per_latent()
        latent_size = (height // factor, width // factor)
        count = len(self.prompts)
        groups = [(0, count)] if model.device.type == "cpu" else [(i, i + 1) for i in range(count)]
        images = []
        saved_guidance = model.guidance
        with evaluating(model):
            if self.text_trained:
                self._encode_prompts()
            if not self.classifier_free:
                model.guidance = self.guidance_scale  # a guidance-distilled model takes it as an input
            try:
                for first, end in groups:
                    images += self._sample_together(first, end, latent_size, self.compute_dtype)
            finally:
                model.guidance = saved_guidance
        return images

    def _sample_together(self, first: int, end: int, latent_size: tuple[int, int],
                         dtype: torch.dtype) -> list[Image.Image]:
        """Images for prompts first..end-1, each from the same starting noise (the seed's)."""
        model = self.model
        scheduler, timesteps = self._scheduler(latent_size)
        generator = torch.Generator().manual_seed(self.seed)
        shape = (1, model.family.latent_channels(model), *latent_size)
        # Flow matching starts from pure noise and feeds latents as they are; Euler over ε/v scales both.
        noise = torch.randn(shape, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
        conditioning = {key: value[first:end] for key, value in self.prompt_rows.items()}
        latents = noise.repeat(end - first, 1, 1, 1).to(model.device)
        guided = self.negative is not None
        if guided:  # the prompts and the negative in one batch: one denoiser call per step
            conditioning = {key: torch.cat([value, self.negative_row[key].expand_as(value)])
                            for key, value in conditioning.items()}
        scale_input = getattr(scheduler, "scale_model_input", lambda sample, timestep: sample)
        for timestep in timesteps:
            scaled = scale_input(latents, timestep)
            if guided:
                both = self._predict(torch.cat([scaled, scaled]), timestep, conditioning, dtype)
                prediction, unconditional = both.chunk(2)
                prediction = unconditional + self.guidance_scale * (prediction - unconditional)
            else:
                prediction = self._predict(scaled, timestep, conditioning, dtype)
            latents = scheduler.step(prediction, timestep, latents).prev_sample
        pixels = model.encoders.decode_latents(latents.float())
        arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(array)) for array in arrays]
