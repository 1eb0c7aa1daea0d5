"""Test helper: a real ComfyUI server on this CPU with LoRA Lab mounted, and random models built
at test time (no download), each as small as ComfyUI's model detection allows:

- SD 1.5: a 1-level 320-channel UNet with 768-wide cross-attention, full-size CLIP-L and VAE;
- SDXL: a 3-level 320-channel UNet with SDXL's conditioning (detected as Segmind Vega, an SDXL
  variant), full-size CLIP-L, OpenCLIP-G and VAE, in the original single-file layout;
- FLUX: a full-width transformer with one double and one single block (ComfyUI 0.3.64 fixes the
  width at 3072), as a diffusers-layout diffusion-model file; for the FLUX tier also CLIP-L, the
  full-size T5-XXL in fp8 (ComfyUI's FLUX text encoder takes no smaller T5: it fixes the width at
  4096 and the transformer's text input with it) and the FLUX VAE, as separate files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def build_sd15_checkpoint(path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from lora_lab.trainer.families.sd15 import CONFIGS
    from transformers import CLIPTextConfig, CLIPTextModel

    from .ldm_layout import write_ldm_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "sd15" / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "sd15" / "text_encoder"))
    for module in (unet, vae, text_encoder):
        module.to(torch.float16)
    write_ldm_checkpoint(unet, vae, text_encoder, path)


def build_sdxl_checkpoint(path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from lora_lab.trainer.families.sd15 import CONFIGS
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .ldm_layout import write_ldm_checkpoint

    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(CONFIGS / "sdxl" / "unet")
    unet = UNet2DConditionModel.from_config({**config, "block_out_channels": [320, 320, 320],
                                             "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": 5})
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "sdxl" / "vae"))
    clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "sdxl" / "text_encoder"))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(CONFIGS / "sdxl" / "text_encoder_2"))
    for module in (unet, vae, clip_l, clip_g):
        module.to(torch.float16)
    write_ldm_checkpoint(unet, vae, clip_l, path, text_encoder_2=clip_g)


def build_flux_model_and_lora(model_path: Path, lora_path: Path, adapter: str = "lora") -> int:
    """A 1+1-block full-width FLUX transformer file (made once), and an adapter of type `adapter`
    for it from LoRA Lab's exporter (random, non-zero weights); returns the adapter's layer count."""
    from diffusers import FluxTransformer2DModel
    from lora_lab.trainer.export import lora_state_dict, named_layers, save_lora
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.families.base import Encoders, LoadedModel, ModelIdentity
    from lora_lab.trainer.families.sd15 import CONFIGS
    from lora_lab.trainer.lora import add_lora, lora_parameters
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = FluxTransformer2DModel.load_config(CONFIGS / "flux" / "transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config({**config, "num_layers": 1, "num_single_layers": 1})
    transformer.to_empty(device="cpu")
    if not model_path.exists():
        state = {k: (torch.randn_like(v) * 0.02).to(torch.bfloat16) for k, v in transformer.state_dict().items()}
        save_file(state, str(model_path))
    model = LoadedModel(get_family("flux"), transformer, Encoders(), None, "flow", ModelIdentity("test", "test"), 1024)
    add_lora(model, 4, 8.0, "attention_mlp", False, adapter)
    for parameter in lora_parameters(model):
        torch.nn.init.normal_(parameter, std=0.01)
    save_lora(lora_path, lora_state_dict(model), {})
    return len(named_layers(model))


def build_flux_transformer(path: Path) -> None:
    """A 1+1-block full-width FLUX transformer in bf16, diffusers layout (about 1 GB)."""
    from diffusers import FluxTransformer2DModel
    from lora_lab.trainer.families.sd15 import CONFIGS
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = FluxTransformer2DModel.load_config(CONFIGS / "flux" / "transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config({**config, "num_layers": 1, "num_single_layers": 1})
    state = {k: (torch.randn(v.shape) * 0.02).to(torch.bfloat16) for k, v in transformer.state_dict().items()}
    save_file(state, str(path))


def build_t5xxl_fp8(path: Path) -> None:
    """T5-XXL v1.1's encoder at full size (24 blocks, 4096 wide, 4.8 GB) with random weights in
    float8_e4m3fn, the layout of ComfyUI's t5xxl_fp8_e4m3fn.safetensors: built block by block
    into one file in about 80 s here."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    width, feed_forward, heads, blocks, vocabulary = 4096, 10240, 64, 24, 32128

    def random(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch.float8_e4m3fn)

    def ones() -> torch.Tensor:
        return torch.ones(width, dtype=torch.float8_e4m3fn)

    tensors = {"shared.weight": random(vocabulary, width, std=1.0), "encoder.final_layer_norm.weight": ones(),
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": random(32, heads, std=0.1)}
    for block in range(blocks):
        prefix = f"encoder.block.{block}.layer."
        tensors.update({prefix + f"0.SelfAttention.{name}.weight": random(width, width) for name in "qkvo"})
        tensors.update({prefix + "0.layer_norm.weight": ones(), prefix + "1.layer_norm.weight": ones(),
                        prefix + "1.DenseReluDense.wi_0.weight": random(feed_forward, width),
                        prefix + "1.DenseReluDense.wi_1.weight": random(feed_forward, width),
                        prefix + "1.DenseReluDense.wo.weight": random(width, feed_forward)})
    save_file(tensors, str(path))


def build_flux_clip_l_and_vae(clip_path: Path, vae_path: Path) -> None:
    """Full-size CLIP-L (fp16, transformers layout) and the FLUX VAE (16 latent channels, the
    original layout), random."""
    from diffusers import AutoencoderKL
    from lora_lab.trainer.families.sd15 import CONFIGS
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .ldm_layout import vae_key

    torch.manual_seed(0)
    clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "sd15" / "text_encoder")).half()
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
               for k, v in clip_l.state_dict().items()}, str(clip_path))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "flux" / "vae"))
    levels = len(vae.config.block_out_channels)
    tensors = {}
    for key, value in vae.state_dict().items():
        name = vae_key(key, levels)
        tensors[name] = value[:, :, None, None] if ".mid.attn_1." in name and value.ndim == 2 else value
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(vae_path))


def build_flux_files(folder: Path) -> dict[str, Path]:
    """The four files of a FLUX.1 install, built into `folder` unless already there (a folder kept
    between sessions, LORA_LAB_FLUX_MODELS, saves the T5's build): {role: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"transformer": folder / "flux_1x1.safetensors", "t5": folder / "t5xxl_fp8_e4m3fn.safetensors",
             "clip_l": folder / "clip_l.safetensors", "vae": folder / "ae.safetensors"}
    builders = {"transformer": lambda: build_flux_transformer(files["transformer"]),
                "t5": lambda: build_t5xxl_fp8(files["t5"]),
                "clip_l": lambda: build_flux_clip_l_and_vae(files["clip_l"], files["vae"])}
    for role, build in builders.items():
        if not files[role].exists() or (role == "clip_l" and not files["vae"].exists()):
            build()
    return files


def flux_install(base: Path, kept: str | None, scratch: Path) -> dict[str, Path]:
    """A ComfyUI base folder holding a FLUX install (the files linked into models/, built into the
    folder `kept` names, else into `scratch`) and the example's dataset folder input/my_dataset
    with two captioned images (two T5 encodes): {role: path} of the files."""
    files = build_flux_files(Path(kept) if kept else scratch)
    return install_files(base, files, {"transformer": "diffusion_models", "t5": "text_encoders",
                                       "clip_l": "text_encoders", "vae": "vae"})


def install_files(base: Path, files: dict[str, Path], kinds: dict[str, str],
                  builders: dict | None = None) -> dict[str, Path]:
    """Build each missing file that `builders` (role -> function of the path) knows, link each
    file into the ComfyUI base folder's models/<kind> (`kinds`: role -> kind), and make the
    examples' dataset folder input/my_dataset with two captioned images; returns `files`."""
    from lora_lab.trainer import embedded

    for role, build in (builders or {}).items():
        if not files[role].exists():
            build(files[role])
    for role, kind in kinds.items():
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
        (base / "models" / kind / files[role].name).symlink_to(files[role])
    dataset = base / "input" / "my_dataset"
    dataset.mkdir(parents=True)
    for image in sorted(embedded.CONCEPT_DATASET.glob("*/*.png"))[:2]:
        shutil.copy(image, dataset)
        shutil.copy(image.with_suffix(".txt"), dataset)
    return files


QWEN_FAMILY_KINDS = {"transformer": "diffusion_models", "qwen": "text_encoders", "vae": "vae"}


def build_zimage_transformer(path: Path) -> None:
    """Z-Image's transformer at full width (3840, as ComfyUI requires to load it as Z-Image) with
    one main block and its two noise and two context refiners, random, in bf16 and in Tongyi's and
    ComfyUI's layout (fused q/k/v): 0.9 B parameters, 1.8 GB."""
    from diffusers import ZImageTransformer2DModel
    from lora_lab.trainer.families.dit import CONFIGS
    from safetensors.torch import save_file

    from .ldm_layout import zimage_original_layout

    generator = torch.Generator().manual_seed(0)
    config = ZImageTransformer2DModel.load_config(CONFIGS / "zimage" / "transformer")
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config({**config, "n_layers": 1})
    state = {}
    for key, value in transformer.state_dict().items():
        ones = value.ndim == 1 and ("norm" in key.rsplit(".", 2)[-2] or key.startswith("cap_embedder.0"))
        state[key] = torch.ones(value.shape) if ones else torch.randn(value.shape, generator=generator) * 0.02
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in zimage_original_layout(state).items()}, str(path))


def build_qwen3_4b_fp8(path: Path) -> None:
    """Qwen3-4B (36 layers, 2560 wide, ComfyUI's fixed config for Z-Image's and FLUX.2 Klein 4B's
    text encoder) with random weights in float8_e4m3fn, transformers' layout as ComfyUI's
    qwen_3_4b.safetensors holds it: 4.0 GB, built layer by layer."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    width, feed_forward, heads, kv_heads, head_dim, layers, vocabulary = 2560, 9728, 32, 8, 128, 36, 151936

    def random(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch.float8_e4m3fn)

    def ones(size: int = width) -> torch.Tensor:
        return torch.ones(size, dtype=torch.float8_e4m3fn)

    tensors = {"model.embed_tokens.weight": random(vocabulary, width, std=1.0), "model.norm.weight": ones()}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        tensors.update({
            prefix + "input_layernorm.weight": ones(), prefix + "post_attention_layernorm.weight": ones(),
            prefix + "self_attn.q_proj.weight": random(heads * head_dim, width),
            prefix + "self_attn.k_proj.weight": random(kv_heads * head_dim, width),
            prefix + "self_attn.v_proj.weight": random(kv_heads * head_dim, width),
            prefix + "self_attn.o_proj.weight": random(width, heads * head_dim),
            prefix + "self_attn.q_norm.weight": ones(head_dim), prefix + "self_attn.k_norm.weight": ones(head_dim),
            prefix + "mlp.gate_proj.weight": random(feed_forward, width),
            prefix + "mlp.up_proj.weight": random(feed_forward, width),
            prefix + "mlp.down_proj.weight": random(width, feed_forward)})
    save_file(tensors, str(path))


def zimage_install(base: Path, kept: str | None, scratch: Path) -> dict[str, Path]:
    """A ComfyUI base folder holding a Z-Image install ComfyUI 0.33 loads as Z-Image (the files
    built into the folder `kept` names, else into `scratch`, and linked into models/), and the
    dataset folder input/my_dataset with two captioned images: {role: path} of the files."""
    folder = Path(kept) if kept else scratch
    folder.mkdir(parents=True, exist_ok=True)
    files = {"transformer": folder / "z_image_1block.safetensors", "qwen": folder / "qwen_3_4b_fp8_e4m3fn.safetensors",
             "vae": folder / "ae.safetensors"}
    builders = {"transformer": build_zimage_transformer, "qwen": build_qwen3_4b_fp8,
                "vae": lambda path: build_flux_clip_l_and_vae(folder / "clip_l.safetensors", path)}  # FLUX.1's VAE
    return install_files(base, files, QWEN_FAMILY_KINDS, builders)


def build_flux2_transformer(path: Path) -> None:
    """A FLUX.2 [klein] transformer ComfyUI detects as FLUX.2 (it reads widths and block counts from
    the file): 256 wide (two 128-wide heads), one double and one single block, taking Qwen3-4B's
    7680-wide text; random, bf16, in BFL's and ComfyUI's layout."""
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    from .ldm_layout import flux2_original_layout

    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1,
                                              attention_head_dim=128, num_attention_heads=2, joint_attention_dim=7680,
                                              guidance_embeds=False)
    state = {key: torch.ones(value.shape) if "norm" in key else torch.randn(value.shape, generator=generator) * 0.02
             for key, value in transformer.state_dict().items()}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in flux2_original_layout(state).items()}, str(path))


def build_flux2_vae(path: Path) -> None:
    """FLUX.2's VAE at full size (32 latent channels, the batch-norm statistics of its 2x2-folded
    latents), random, in the original layout ComfyUI reads as flux2-vae.safetensors."""
    from diffusers import AutoencoderKLFlux2
    from lora_lab.trainer.families.dit import CONFIGS
    from safetensors.torch import save_file

    from .ldm_layout import vae_key

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(CONFIGS / "flux2" / "vae"))
    vae.bn.running_mean.copy_(torch.randn(128) * 0.1)
    vae.bn.running_var.copy_(torch.rand(128) + 0.5)
    levels = len(vae.config.block_out_channels)
    tensors = {}
    for key, value in vae.state_dict().items():
        name = vae_key(key, levels)
        tensors[name] = value[:, :, None, None] if ".mid.attn_1." in name and value.ndim == 2 else value
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, str(path))


def flux2_install(base: Path, kept: str | None, scratch: Path) -> dict[str, Path]:
    """A ComfyUI base folder holding a FLUX.2 [klein] 4B install ComfyUI loads as FLUX.2 (built into
    the folder `kept` names, else `scratch`; Qwen3-4B is the file Z-Image uses), and the dataset
    folder input/my_dataset with two captioned images: {role: path} of the files."""
    folder = Path(kept) if kept else scratch
    folder.mkdir(parents=True, exist_ok=True)
    files = {"transformer": folder / "flux2_klein_1x1.safetensors", "qwen": folder / "qwen_3_4b_fp8_e4m3fn.safetensors",
             "vae": folder / "flux2-vae.safetensors"}
    builders = {"transformer": build_flux2_transformer, "qwen": build_qwen3_4b_fp8, "vae": build_flux2_vae}
    return install_files(base, files, QWEN_FAMILY_KINDS, builders)


class ComfyServer:
    """`python main.py --cpu` in its own base directory, with this repository as a custom node."""

    def __init__(self, comfy_dir: Path, base: Path, python: str, extra_args: tuple[str, ...] = ()) -> None:
        self.comfy_dir, self.base, self.python, self.extra_args = comfy_dir, base, python, extra_args
        for folder in ("models/checkpoints", "models/loras", "input", "output", "custom_nodes"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / "lora-lab"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--disable-api-nodes", "--preview-method", "none",
             *self.extra_args],
            cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log()}")
            try:
                self.get("/object_info/LoraLabTrainLora")
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, route: str) -> dict:
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, route: str) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return response.read()

    def post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
        except urllib.error.HTTPError as error:  # say why the server refused (a prompt that did not validate)
            body = error.read()
            raise urllib.error.HTTPError(error.url, error.code, f"{error.msg}: {body.decode(errors='replace')[:3000]}",
                                         error.headers, io.BytesIO(body)) from None
        return json.loads(text) if text else {}

    def websocket(self):
        import websocket

        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=600)

    def run(self, prompt: dict, on_message=None, timeout: float = 900) -> tuple[str, list[dict]]:
        """Queue a prompt and collect its websocket messages until it finishes and its history is
        written; returns (prompt id, messages)."""
        prompt_id, messages = self._run(prompt, on_message, timeout)
        for _ in range(100):
            if prompt_id in self.get(f"/history/{prompt_id}"):
                break
            time.sleep(0.1)
        return prompt_id, messages

    def _run(self, prompt: dict, on_message, timeout: float) -> tuple[str, list[dict]]:
        ws = self.websocket()
        try:
            prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
            messages, deadline = [], time.time() + timeout
            while time.time() < deadline:
                raw = ws.recv()
                if not isinstance(raw, str):
                    continue
                message = json.loads(raw)
                messages.append(message)
                if on_message:
                    on_message(self, message)
                data = message.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                if message["type"] in ("execution_error", "execution_interrupted"):
                    return prompt_id, messages
                if message["type"] == "executing" and data.get("node") is None:
                    return prompt_id, messages
            raise TimeoutError("prompt did not finish")
        finally:
            ws.close()


def output_images(server: ComfyServer, prompt_id: str, node: str) -> list[np.ndarray]:
    """A finished prompt's images from one output node, as RGB int16 arrays (for exact comparison)."""
    outputs = server.get(f"/history/{prompt_id}")[prompt_id]["outputs"][node]["images"]
    return [np.asarray(Image.open(io.BytesIO(server.get_bytes(
        f"/view?filename={i['filename']}&subfolder={i['subfolder']}&type={i['type']}"))).convert("RGB"), np.int16)
        for i in outputs]


def add_core_comparison(prompt: dict, conditioning: dict) -> None:
    """Beside a shipped example's API prompt, core nodes on the example's own conditioning and
    sampler (node 15): the base model (node 27), and the final LoRA through LoraLoaderModelOnly at
    the stack's 0.7 (node 31); and a preview of Sample Checkpoint's cells (node 20)."""
    sampler = {key: prompt["15"]["inputs"][key] for key in ("seed", "steps", "cfg", "sampler_name", "scheduler",
                                                            "denoise")}
    prompt.update({
        "20": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
        "25": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **conditioning, **sampler}},
        "26": {"class_type": "VAEDecode", "inputs": {"samples": ["25", 0], "vae": ["3", 0]}},
        "27": {"class_type": "PreviewImage", "inputs": {"images": ["26", 0]}},
        "28": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": ["6", 4],
                                                               "strength_model": 0.7}},
        "29": {"class_type": "KSampler", "inputs": {"model": ["28", 0], **conditioning, **sampler}},
        "30": {"class_type": "VAEDecode", "inputs": {"samples": ["29", 0], "vae": ["3", 0]}},
        "31": {"class_type": "PreviewImage", "inputs": {"images": ["30", 0]}},
    })


def assert_matches_core_nodes(server: ComfyServer, prompt_id: str) -> None:
    """A run of `add_core_comparison`'s prompt: the grid of steps 2 and 4 at strengths 0 and 0.7
    (one base image serves both rows) and the stack's image (node 17) against the core nodes'."""
    cells = output_images(server, prompt_id, "20")
    base = output_images(server, prompt_id, "27")[0]
    with_lora = output_images(server, prompt_id, "31")[0]
    through_stack = output_images(server, prompt_id, "17")[0]  # the example's own SaveImage
    assert len(cells) == 4
    assert np.array_equal(cells[0], base) and np.array_equal(cells[2], base), "strength 0 is not the base image"
    assert not np.array_equal(with_lora, base), "the LoRA changed nothing"
    assert np.array_equal(through_stack, with_lora), "Apply LoRA Stack differs from core LoraLoaderModelOnly"
    assert np.array_equal(cells[3], with_lora), "the last cell is not what LoraLoader makes of the final file"


def train_settings(**overrides) -> dict:
    """Train LoRA's widgets for a quick run at 64 px on the random model."""
    return {"preset": "none", "steps": 30, "rank": 4, "alpha": 0.0, "learning_rate": 0.001, "resolution": 64,
            "batch_size": 1, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "save_every": 10,
            "seed": 1, "name": "run", "gradient_checkpointing": False, "mixed_precision": "auto",
            "min_snr_gamma": 0.0, "noise_offset": 0.0, "bucketing": True, "resume": "off",
            "resume_with_changes": False, "sample_every": -1, "prompts": "{trigger}", "validation_images": -1,
            "background": False, **overrides}


def training_graph(checkpoint: str, settings: dict, extra: dict | None = None, trigger: str = "") -> dict:
    """Load Checkpoint → Load Dataset (the concept set in input/concept) → Train LoRA with `settings`."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
            "2": {"class_type": "LoraLabLoadDataset", "inputs": {"folder": "concept", "lora_type": "object",
                                                                 "trigger_word": trigger, "model": ["1", 0]}},
            "3": {"class_type": "LoraLabTrainLora", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                              "dataset": ["2", 0], **settings}},
            **(extra or {})}


def small_training(checkpoint: str, name: str, trigger: str, seed: int, steps: int = 6, save_every: int = 3,
                   **settings) -> dict:
    """A prompt that trains a small LoRA named `name` quickly, at a learning rate that shows in its images."""
    return training_graph(checkpoint, train_settings(steps=steps, save_every=save_every, batch_size=2,
                                                     learning_rate=0.01, seed=seed, name=name, **settings),
                          trigger=trigger)


def comfy_python(comfy_dir: Path) -> str:
    return os.environ.get("COMFYUI_PYTHON") or shutil.which("python") or sys.executable


def frontend_args() -> tuple[str, ...]:
    """`--front-end-root` when LORA_LAB_FRONTEND_ROOT names another frontend build (e.g. the static
    folder of a newer comfyui-frontend-package than the checkout pins)."""
    root = os.environ.get("LORA_LAB_FRONTEND_ROOT")
    return ("--front-end-root", root) if root else ()
