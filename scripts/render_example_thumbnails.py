"""Render the Templates browser's thumbnail of each example (`example_workflows/<name>.jpg`) from a
real run in the real frontend, against a running ComfyUI with LoRA Lab installed:

    python scripts/render_example_thumbnails.py --url http://127.0.0.1:8188 \
        --checkpoint random_sd15.safetensors --dataset concept

The SD 1.5 example is run at 64 px (a few minutes on a CPU); its two checkpoints then feed the
compare and stack examples. FLUX.1-dev cannot run on a machine without a GPU of its size: its
thumbnail shows the workflow as loaded.
"""

from __future__ import annotations

import argparse
import io
import json
import time

from build_example_workflows import COMPARE_LORAS, STACK_TWO, TRAIN_AND_TEST, TRAIN_FLUX, example_path
from comfy_browser import fit_view, launch, load_workflow, open_comfyui, set_widgets
from PIL import Image

THUMBNAIL_SIDE = 768  # square, as the Templates browser's cards are


def queue_and_wait(page, output_node: int, timeout: float = 900) -> None:
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("(id) => window.app.nodeOutputs?.[String(id)]", arg=output_node, timeout=timeout * 1000)


def save_thumbnail(page, example, node_ids: list[int]) -> None:
    """The nodes that tell the example's story, large enough to read (the canvas drops text below
    60 % zoom)."""
    fit_view(page, node_ids=node_ids, min_scale=0.62)
    # The canvas loads a node's pictures when it first draws the node on screen.
    page.wait_for_function("(ids) => ids.every((id) => !window.app.nodeOutputs?.[String(id)]?.images"
                           " || (window.app.graph.getNodeById(id).imgs ?? []).some((img) => img.naturalWidth))",
                           arg=node_ids, timeout=30_000)
    picture = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    picture = picture.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    path = example_path(example).with_suffix(".jpg")
    picture.save(path, quality=88)
    print(f"wrote {path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--checkpoint", required=True, help="an SD 1.5 checkpoint in the server's models/checkpoints")
    parser.add_argument("--dataset", required=True, help="a dataset folder in the server's input folder")
    parser.add_argument("--trigger", default="zkw_toy")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    small = {"width": 64, "height": 64, "steps": 2}
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page, _ = open_comfyui(browser, args.url, viewport=(1100, 1100))
        run = f"thumbnail_{int(time.time())}"
        load_workflow(page, json.loads(example_path(TRAIN_AND_TEST).read_text()))
        set_widgets(page, 1, {"ckpt_name": args.checkpoint})
        set_widgets(page, 2, {"folder": args.dataset, "trigger_word": args.trigger})
        set_widgets(page, 3, {"trigger_word": args.trigger})
        set_widgets(page, 4, {"steps": 40, "resolution": 64, "batch_size": 2, "rank": 4, "learning_rate": 0.001,
                              "save_every": 20, "name": run})
        set_widgets(page, 5, {**small, "strengths": "0, 0.5, 1", "prompts": "{trigger}"})
        set_widgets(page, 9, {"width": 64, "height": 64})
        set_widgets(page, 10, {"steps": 2})
        queue_and_wait(page, 5)
        save_thumbnail(page, TRAIN_AND_TEST, [4, 5])
        loras = [f"lora_lab/{run}/{run}-step000020.safetensors", f"lora_lab/{run}/{run}.safetensors"]
        page.evaluate("() => fetch('/api/refresh', {method: 'POST'}).catch(() => {})")
        load_workflow(page, json.loads(example_path(COMPARE_LORAS).read_text()))
        set_widgets(page, 1, {"ckpt_name": args.checkpoint})
        set_widgets(page, 2, {**small, "lora_names": "\n".join(loras), "prompts": args.trigger,
                              "strengths": "0, 0.5, 1"})
        queue_and_wait(page, 2)
        save_thumbnail(page, COMPARE_LORAS, [1, 2, 3])
        page.reload()
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        load_workflow(page, json.loads(example_path(STACK_TWO).read_text()))
        set_widgets(page, 1, {"ckpt_name": args.checkpoint})
        set_widgets(page, 2, {"lora_1": loras[0], "lora_2": loras[1]})
        set_widgets(page, 3, {"text": args.trigger})
        set_widgets(page, 5, {"width": 64, "height": 64})
        set_widgets(page, 6, {"steps": 2})
        queue_and_wait(page, 8)
        save_thumbnail(page, STACK_TWO, [2, 6, 8])
        load_workflow(page, json.loads(example_path(TRAIN_FLUX).read_text()))
        save_thumbnail(page, TRAIN_FLUX, [6, 7])
        browser.close()


if __name__ == "__main__":
    main()
