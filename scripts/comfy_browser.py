"""A real ComfyUI page in headless Chromium, driven by Playwright: used by the example builder (to
measure node sizes and take thumbnails) and by the browser tests.

Debian's Chromium (`apt-get install chromium`) is launched through `executable_path`; Playwright's
own browser download is never used. The flags keep Chromium off the network (this machine has
none) and quiet.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

CHROMIUM = os.environ.get("LORA_LAB_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
# Settings a first visit would otherwise interrupt with dialogs (the template browser, the release notes).
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Release.Version": "9.99.99",
                  "Comfy.Release.Status": "skipped", "Comfy.Release.Timestamp": 4102444800000,
                  "Comfy.Minimap.Visible": False, "Comfy.VueNodes.Enabled": False}


def set_settings(url: str, settings: dict[str, Any]) -> None:
    """Store settings for the page's next load (ComfyUI keeps them per user on the server)."""
    for key, value in settings.items():
        request = urllib.request.Request(f"{url}/api/settings/{key}", data=json.dumps(value).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()


@dataclass
class PageErrors:
    """Console errors and uncaught exceptions seen on the page."""

    messages: list[str] = field(default_factory=list)

    def listen(self, page: Any) -> None:
        page.on("console", lambda message: self.messages.append(f"console {message.type}: {message.text} "
                                                                f"({message.location.get('url', '')})")
                if message.type == "error" else None)
        page.on("pageerror", lambda error: self.messages.append(f"page error: {error} {error.stack or ''}"))

    def ours(self) -> list[str]:
        """Errors that come from LoRA Lab's own files or name it. Not counted: the Model Library's
        request for the preview of a LoRA that has none (a checkpoint saved at Cancel carries no
        sample), which ComfyUI answers with 404 for any such model."""
        return [m for m in self.messages if ("lora_lab" in m.lower() or "lora-lab" in m.lower())
                and not ("404" in m and "/models/preview/" in m)]


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)


def open_comfyui(browser: Any, url: str, settings: dict[str, Any] | None = None,
                 viewport: tuple[int, int] = (1600, 1000)) -> tuple[Any, PageErrors]:
    """A page with ComfyUI loaded and its app ready; `settings` are stored first (e.g. Nodes 2.0)."""
    set_settings(url, {**QUIET_SETTINGS, **(settings or {})})
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    errors = PageErrors()
    errors.listen(page)
    page.goto(url)
    page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=120_000)
    time.sleep(1.0)  # extensions finish their setup
    return page, errors


def load_workflow(page: Any, workflow: dict) -> None:
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    time.sleep(0.5)


NODE_FACTS = """() => {
  const root = window.app.graph;
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  return root._nodes.map((n) => ({
    id: Number(n.id), type: n.type, title: n.title, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
    titleHeight: title,
    widgets: (n.widgets ?? []).map((w) => ({ name: w.name, type: w.type, value: w.value,
                                              y: w.y ?? w.last_y ?? null,
                                              height: w.computedHeight ?? w.computeSize?.(n.size[0])?.[1] ?? null,
                                              serialize: w.serialize !== false })),
  }));
}"""


def node_facts(page: Any) -> list[dict]:
    """Every root-graph node's position, size and widgets (with values) as the frontend holds them;
    ids as numbers (some frontends keep them as strings)."""
    return page.evaluate(NODE_FACTS)


def fit_view(page: Any, scale: float | None = None, node_ids: list[int] | None = None, min_scale: float = 0) -> None:
    """Show the whole graph (or the nodes `node_ids`) on screen, zoomed out no further than
    `min_scale`; or zoom to `scale` with its top left in view."""
    page.evaluate("""([scale, ids, least]) => {
        const canvas = window.app.canvas, element = canvas.canvas;
        // Ids compared as text: some frontends keep them as strings.
        const nodes = canvas.graph._nodes.filter((n) => !ids || ids.map(String).includes(String(n.id)));
        if (!nodes.length) throw new Error(`fit_view: no node ${ids}`);
        const left = Math.min(...nodes.map((n) => n.pos[0])) - 40;
        const top = Math.min(...nodes.map((n) => n.pos[1])) - 80;
        const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 40;
        const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 40;
        // Newer frontends lay the side bar and the top bar over the canvas: find where it shows.
        const box = element.getBoundingClientRect();
        const shows = (x, y) => document.elementFromPoint(x, y) === element;
        let coveredLeft = 0, coveredTop = 0;
        while (coveredLeft < 200 && !shows(box.left + coveredLeft, box.top + box.height / 2)) coveredLeft += 4;
        while (coveredTop < 200 && !shows(box.left + box.width / 2, box.top + coveredTop)) coveredTop += 4;
        const fit = Math.min((element.clientWidth - coveredLeft) / (right - left),
                             (element.clientHeight - coveredTop) / (bottom - top));
        canvas.ds.scale = scale ?? Math.max(fit, least);
        canvas.ds.offset = [coveredLeft / canvas.ds.scale - left, coveredTop / canvas.ds.scale - top];
        canvas.setDirty(true, true);
    }""", [scale, node_ids, min_scale])
    time.sleep(0.5)


def set_widgets(page: Any, node_id: int, values: dict[str, Any]) -> None:
    """Set widgets of a root-graph node by name, as a person would in the UI."""
    page.evaluate("""([id, values]) => {
        const node = window.app.graph.getNodeById(id);
        for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
    }""", [node_id, values])
