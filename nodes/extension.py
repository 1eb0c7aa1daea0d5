"""The ComfyUI extension: the list of LoRA Lab nodes (their ids and input order are public API), the
routes the frontend reads, and prompts taking turns with background training (nodes/jobs.py)."""

from __future__ import annotations

from .apply_lora_stack import ApplyLoraStack
from .caption import Caption
from .comfy_bridge import ComfyExtension, io, run_prompts_in_turns
from .compare_lora_stack import CompareLoraStack
from .jobs import TURNS
from .load_dataset import LoadDataset
from .routes import register as register_routes
from .sample_checkpoint import SampleCheckpoint
from .train_lora import TrainLora

NODES: list[type[io.ComfyNode]] = [LoadDataset, Caption, TrainLora, SampleCheckpoint, ApplyLoraStack,
                                   CompareLoraStack]


class LoraLabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Called once as ComfyUI loads the pack, before its server adds routes (ComfyUI 0.3.x never
        # calls on_load, so the routes are added here).
        register_routes()
        TURNS.installed = run_prompts_in_turns(TURNS.prompt_turn)
        return NODES
