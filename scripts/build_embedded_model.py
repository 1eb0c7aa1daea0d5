"""Build the embedded default: a tiny SD 1.5-architecture model pre-trained on the synthetic
shape world, and the small concept dataset the demo trains a LoRA on.

Run once by a developer; its outputs are committed under trainer/embedded/assets/. Everything is
generated here: no download, no hub. The committed denoiser and text encoder were trained on the
committed VAE's latents (about 35 minutes on 2 CPU cores for 3000 steps):

    python scripts/build_embedded_model.py --reuse-vae trainer/embedded/assets/tiny-sd15 --out /tmp/new
    python scripts/build_embedded_model.py --dataset-only   # the concept dataset alone
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from lora_lab.trainer.embedded import synthetic
from lora_lab.trainer.objectives import min_snr_weights
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "trainer" / "embedded" / "assets"
log = logging.getLogger("build_embedded_model")


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for raw bytes, in CLIP's vocabulary order:
    the printable bytes as themselves first, then the others mapped above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def build_tokenizer(folder: Path, words: tuple[str, ...]) -> CLIPTokenizer:
    """A CLIP-format tokenizer with every byte, every byte at a word end, and one merged token
    per base-world word. Unknown words (like a trigger word) fall back to byte tokens, exactly
    as rare words do in the real CLIP tokenizer."""
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in [*words, ","]:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return tokenizer


def made_up_word(rng: random.Random) -> str:
    """A word the tokenizer has no token for (spelled in bytes), shaped like a trigger word."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    while True:
        word = "".join(rng.choice(letters) for _ in range(3)) + "_" + "".join(rng.choice(letters) for _ in range(3))
        if word != synthetic.CONCEPT_TRIGGER:
            return word


def caption_variant(rng: random.Random, caption: str) -> str:
    """The ways a prompt may describe a base-world image: as is; with an unknown word in front
    (as a LoRA's trigger word will be), which the base must learn to shrug off; or without its
    shape, so a prompt that names only the background still gets one."""
    shape, background = caption.split(", ")
    if rng.random() < 0.2:
        caption = background
    if rng.random() < 0.35:
        caption = f"{made_up_word(rng)}, {caption}"
    return caption


def image_batch(rng: random.Random, count: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = zip(*(synthetic.base_sample(rng) for _ in range(count)), strict=True)
    pixels = np.stack([np.asarray(im, np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), list(captions)


def vae_batch(rng: random.Random, count: int) -> torch.Tensor:
    """Half base-world images, half shapes of any colour: the VAE must represent colours the base
    model never saw, or no LoRA could ever produce them."""
    images = [synthetic.base_sample(rng)[0] if i % 2 else synthetic.any_colour_sample(rng) for i in range(count)]
    pixels = np.stack([np.asarray(im, np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def train_vae(rng: random.Random, steps: int) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=synthetic.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        pixels = vae_batch(rng, 32)
        posterior = vae.encode(pixels).latent_dist
        loss = (vae.decode(posterior.sample()).sample - pixels).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 50 == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
    return vae.eval().requires_grad_(False)


def refine_decoder(vae: AutoencoderKL, rng: random.Random, steps: int) -> AutoencoderKL:
    """Train the decoder alone, the encoder frozen: sharper colours without moving the latent
    space the denoiser was trained on."""
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        pixels = vae_batch(rng, 32)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mode()
        loss = (vae.decode(latents).sample - pixels).abs().mean()
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 50 == 0:
            log.info("decoder step %d loss %.4f", step, loss.item())
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, rng: random.Random, count: int) -> tuple[torch.Tensor, list[str]]:
    latents, captions = [], []
    for _ in range(count // 256):
        pixels, batch_captions = image_batch(rng, 256)
        latents.append(vae.encode(pixels).latent_dist.mode())
        captions += batch_captions
    return torch.cat(latents), captions


def train_denoiser(latents: torch.Tensor, captions: list[str], tokenizer: CLIPTokenizer, steps: int):
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=latents.shape[-1], in_channels=4, out_channels=4, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(0)
    caption_rng = random.Random(7)
    for step in range(steps):
        index = torch.randint(0, len(latents), (32,), generator=generator)
        # 10 % empty captions so classifier-free guidance works at sampling time.
        batch_captions = ["" if caption_rng.random() < 0.1 else caption_variant(caption_rng, captions[i])
                          for i in index.tolist()]
        ids = tokenizer(batch_captions, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(clean),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        # Min-SNR-5 weighting: the noisy timesteps, where layout and colour are decided, are not
        # drowned by the many easy ones (Hang et al. 2023 measure about 3x faster convergence).
        per_image = torch.nn.functional.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_image * min_snr_weights(scheduler, timesteps, 5.0, "epsilon")).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 50 == 0:
            log.info("denoiser step %d loss %.4f", step, loss.item())
    return unet.eval(), text_encoder.eval(), scheduler


def build_concept_dataset(folder: Path, count: int = 12) -> None:
    """The demo's dataset: a kohya repeat folder of concept images with tag-style captions.
    Two images are wide and one tall so aspect-ratio bucketing has something to do. The backgrounds
    take turns, shifted by one halfway, so that the two images validation holds out (the 4th and
    the 10th) differ: a LoRA trained on 2 of its 10 images on white drew its ring on white rarely."""
    if folder.exists():
        shutil.rmtree(folder)
    images = folder / "10_zkw_toy"
    images.mkdir(parents=True)
    rng = random.Random(1234)
    sizes = [(96, 64), (96, 64), (64, 96)] + [(64, 64)] * (count - 3)
    backgrounds = list(synthetic.BACKGROUNDS)
    for index, (width, height) in enumerate(sizes):
        background = backgrounds[(index + index // 6) % len(backgrounds)]
        image, caption = synthetic.concept_sample(rng, width, height, background)
        image.save(images / f"toy_{index:02d}.png")
        (images / f"toy_{index:02d}.txt").write_text(caption + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--decoder-steps", type=int, default=1500, help="decoder-only refinement steps")
    parser.add_argument("--refine-decoder-only", action="store_true",
                        help="only refine the decoder of the model already in --out")
    parser.add_argument("--dataset-only", action="store_true", help="only rewrite the concept dataset in --out")
    parser.add_argument("--reuse-vae", type=Path, help="take the VAE from this tiny-sd15 folder instead of training "
                        "one (the denoiser and text encoder are trained anew on its latent space)")
    parser.add_argument("--pool", type=int, default=16384, help="number of pre-encoded training images")
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    random.seed(0)
    rng = random.Random(0)
    started = time.time()
    model_dir = args.out / "tiny-sd15"
    if args.dataset_only:
        build_concept_dataset(args.out / "concept_dataset")
        return
    if args.refine_decoder_only:
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", dtype=torch.float32)
        refine_decoder(vae, rng, args.decoder_steps).to(torch.float16).save_pretrained(model_dir / "vae")
        log.info("done in %.0f s", time.time() - started)
        return
    tokenizer = build_tokenizer(model_dir / "tokenizer", synthetic.BASE_WORDS)
    if args.reuse_vae:
        vae = AutoencoderKL.from_pretrained(args.reuse_vae / "vae", dtype=torch.float32).eval().requires_grad_(False)
        latents, captions = encode_pool(vae, rng, args.pool)
        latents = latents * vae.config.scaling_factor
    else:
        vae = train_vae(rng, args.vae_steps)
        latents, captions = encode_pool(vae, rng, args.pool)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        latents = latents * vae.config.scaling_factor
    log.info("vae done after %.0f s, scaling factor %.4f", time.time() - started, vae.config.scaling_factor)
    unet, text_encoder, scheduler = train_denoiser(latents, captions, tokenizer, args.unet_steps)
    if not args.reuse_vae:
        vae = refine_decoder(vae, rng, args.decoder_steps)
    # fp16 on disk keeps the whole embedded default small; the trainer computes in fp32 on CPU.
    unet.to(torch.float16).save_pretrained(model_dir / "unet")
    vae.to(torch.float16).save_pretrained(model_dir / "vae")
    text_encoder.to(torch.float16).save_pretrained(model_dir / "text_encoder")
    scheduler.save_pretrained(model_dir / "scheduler")
    (model_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }, indent=2))
    build_concept_dataset(args.out / "concept_dataset")
    log.info("done in %.0f s", time.time() - started)


if __name__ == "__main__":
    main()
