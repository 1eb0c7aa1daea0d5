"""LoRA Lab: train LoRA adapters inside ComfyUI.

ComfyUI imports this folder as a package and calls `comfy_entrypoint`. Importing the package
must not import ComfyUI (the standalone trainer and CLI use it too), so the nodes are loaded
lazily, only when ComfyUI asks for them.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():  # noqa: ANN201 - the return type lives in ComfyUI's API
    from .nodes.extension import LoraLabExtension

    return LoraLabExtension()
