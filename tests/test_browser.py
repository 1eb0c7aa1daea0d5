"""What a person sees: the real ComfyUI frontend in headless Chromium, against a real server.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout (like the server tests) and Playwright for
Python and Debian's Chromium are installed (`pip install playwright`, `apt-get install chromium`;
never `playwright install`). LORA_LAB_FRONTEND_ROOT runs it against another frontend build,
LORA_LAB_VUE_NODES=1 in the frontend's "Nodes 2.0" mode. Screenshots go to LORA_LAB_SCREENSHOTS
(default: a temporary folder); their paths are printed.

Checked: every example loads with the values it means and no two nodes overlap; the Templates
browser shows the examples with thumbnails; the SD 1.5 example trains with a training panel that
shows step and loss and covers no widget, keeps its whole curve across a page reload, shows the
Cancel message inside the node, and ends with the grid and loss images in view; the FLUX
example (with the FLUX install of tests/test_comfyui_flux.py: LORA_LAB_FLUX_MODELS keeps its
files) trains, samples its grid and feeds the user's sampler through its stack; a dropped LoRA
file opens the graph that trained it (from the example, or from the command line); the Stack two
LoRAs example draws Compare LoRA Stack's grid of two trained LoRAs readable on the node; Train LoRA's
lora_name links to core LoraLoader; a Train LoRA node inside a subgraph gets its panel; and none
of it logs an error from LoRA Lab's files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from lora_lab.trainer import embedded

from .comfy_server import (
    REPO,
    ComfyServer,
    build_sd15_checkpoint,
    comfy_python,
    flux_install,
    frontend_args,
    small_training,
)

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
playwright_api = pytest.importorskip("playwright.sync_api") if COMFYUI_DIR else None
sys.path.insert(0, str(REPO / "scripts"))
from build_example_workflows import (  # noqa: E402
    EXAMPLES,
    STACK_TWO,
    TRAIN_AND_TEST,
    TRAIN_FLUX,
    example_path,
    intended_values,
    missing_nodes,
)
from comfy_browser import (  # noqa: E402
    CHROMIUM,
    fit_view,
    launch,
    load_workflow,
    node_facts,
    open_comfyui,
    set_widgets,
)
from render_example_thumbnails import THUMBNAIL_SIDE  # noqa: E402

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR or not Path(CHROMIUM).exists(),
                                 reason="set COMFYUI_DIR (and install chromium and playwright) to run")]
VUE_NODES = os.environ.get("LORA_LAB_VUE_NODES") == "1"
SETTINGS = {"Comfy.VueNodes.Enabled": VUE_NODES}
CHECKPOINT = "random_sd15.safetensors"
SMALL_TRAINING = {"steps": 40, "resolution": 64, "batch_size": 2, "rank": 4, "learning_rate": 0.001,
                  "save_every": 20}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LORA_LAB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_browser")
    (base / "models" / "checkpoints").mkdir(parents=True)
    build_sd15_checkpoint(base / "models" / "checkpoints" / CHECKPOINT)
    shutil.copytree(embedded.CONCEPT_DATASET, base / "input" / "concept")
    comfy = ComfyServer(Path(COMFYUI_DIR), base, comfy_python(Path(COMFYUI_DIR)), frontend_args())
    comfy.start()
    yield comfy
    comfy.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page, errors = open_comfyui(browser, server.url, SETTINGS)
    yield page, errors
    assert not errors.ours(), errors.ours()  # zero errors from LoRA Lab's files, whatever the test did
    page.close()


def shot(page, folder: Path, name: str, description: str) -> None:
    path = folder / f"{name}{'-vue' if VUE_NODES else ''}.png"
    page.screenshot(path=str(path))
    print(f"screenshot {path}: {description}")


def overlaps(facts: list[dict]) -> list[tuple]:
    """Pairs of nodes whose boxes (title bar included) intersect."""
    boxes = [(f["id"], f["pos"][0], f["pos"][1] - f["titleHeight"], f["pos"][0] + f["size"][0],
              f["pos"][1] + f["size"][1]) for f in facts]
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_examples_load_with_the_values_they_mean(page, server, example, screenshots):
    page, _ = page
    object_info = server.get("/object_info")
    lacking = missing_nodes(example, object_info)
    if lacking and example.needs:  # the FLUX.2 example on a ComfyUI before 0.11
        pytest.skip(f"{example.name} needs ComfyUI {example.needs}: this one has no {', '.join(sorted(lacking))}")
    load_workflow(page, json.loads(example_path(example).read_text()))
    fit_view(page)
    shot(page, screenshots, f"example-{example.name}", "the example as loaded, whole")
    facts = {f["id"]: f for f in node_facts(page)}
    intended = intended_values(example, object_info)
    checked = 0
    for node_id, values in intended.items():
        shown = {w["name"]: w["value"] for w in facts[node_id]["widgets"]}
        for name, value in values.items():
            assert shown[name] == pytest.approx(value) if isinstance(value, float) else shown[name] == value, (
                f"{example.name}: node {node_id} ({facts[node_id]['type']}) {name} = {shown[name]!r}, meant {value!r}")
            checked += 1
    print(f"{example.name}: {checked} widget values as meant; overlapping nodes: {overlaps(list(facts.values()))}")
    assert not overlaps(list(facts.values()))


FROZEN = sorted(p for p in (REPO / "tests" / "fixtures" / "workflows").glob("*/*.json")
                if not p.name.endswith(".api.json"))


@pytest.mark.parametrize("path", FROZEN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_workflow_saved_by_any_release_loads_with_its_values(page, server, path):
    """Workflows saved by earlier releases (tests/fixtures/workflows) load into today's nodes by
    widget name (web/widget_history.json), and queue what the Python model of the frontend says."""
    from frontend_rules import migrate_widgets_values, named_values, ui_to_api

    page, _ = page
    workflow = json.loads(path.read_text())
    load_workflow(page, workflow)
    object_info = server.get("/object_info")
    facts = {f["id"]: f for f in node_facts(page)}
    checked = 0
    for node in workflow["nodes"]:
        if not node["type"].startswith("LoraLab"):
            continue
        meant = named_values(object_info[node["type"]], migrate_widgets_values(node["type"], node["widgets_values"],
                                                                               node.get("properties")))
        shown = {w["name"]: w["value"] for w in facts[node["id"]]["widgets"] if w["serialize"]}
        for name, value in meant.items():
            assert shown[name] == pytest.approx(value) if isinstance(value, float) else shown[name] == value, (
                f"{path.parent.name}/{path.name}: node {node['id']} {name} = {shown[name]!r}, meant {value!r}")
            checked += 1
    queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    expected = ui_to_api(workflow, object_info)
    for node_id, node in expected.items():
        if node["class_type"].startswith("LoraLab"):
            assert queued[node_id]["inputs"] == node["inputs"], f"{path.name}: node {node_id} queues other values"
    saved = page.evaluate("() => window.app.graph.serialize().nodes.filter((n) => n.type.startsWith('LoraLab'))"
                          ".map((n) => n.properties.lora_lab_layout)")
    assert saved and all(isinstance(layout, int) for layout in saved)  # saved again: with today's layout
    print(f"{path.parent.name}/{path.name}: {checked} LoRA Lab widget values as meant")


def test_templates_browser_shows_the_examples_with_thumbnails(page, server, screenshots):
    page, _ = page
    templates = server.get("/workflow_templates")
    names = next(v for k, v in templates.items() if "lora" in k.lower())
    assert sorted(names) == sorted(e.name for e in EXAMPLES)
    module = next(k for k in templates if "lora" in k.lower())
    for name in names:  # the thumbnail the browser asks for is there
        assert server.get_bytes(f"/api/workflow_templates/{module}/{name.replace(' ', '%20')}.jpg")[:2] == b"\xff\xd8"
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(module, exact=True).first.click()
    page.wait_for_timeout(1500)
    shot(page, screenshots, "templates", "the Templates browser on LoRA Lab's examples")
    # Each card: its thumbnail loaded (the browser shows them as blob images) and its title shown.
    loaded = page.evaluate("() => [...document.querySelectorAll('img')].filter((img) => img.complete"
                           " && img.naturalWidth >= THUMBNAIL).length".replace("THUMBNAIL", str(THUMBNAIL_SIDE)))
    assert loaded >= len(names)
    for name in names:
        assert page.get_by_text(name, exact=True).count() >= 1, name
    page.get_by_text(TRAIN_AND_TEST.name, exact=True).first.click()
    page.wait_for_function("() => window.app.graph._nodes.some((n) => n.type === 'LoraLabTrainLora')", timeout=30_000)
    facts = {f["id"]: f for f in node_facts(page)}
    assert {w["name"]: w["value"] for w in facts[4]["widgets"]}["name"] == "xyz_style"


def panel_state(page, node_id: int = 4) -> dict:
    """The training panel's text and geometry, and the rectangles of the node's other widgets."""
    return page.evaluate("""(id) => {
        const node = window.app.graph.getNodeById(id);
        const panel = node.loraLabPanel.root.getBoundingClientRect();
        const canvas = window.app.canvas, bounds = canvas.canvas.getBoundingClientRect();
        const toScreen = (x, y) => [bounds.left + (x + canvas.ds.offset[0]) * canvas.ds.scale,
                                    bounds.top + (y + canvas.ds.offset[1]) * canvas.ds.scale];
        const widgets = node.widgets.filter((w) => w.name !== 'lora_lab_panel' && w.y != null
                                             && node.isWidgetVisible(w)).map((w) => {
            const [left, top] = toScreen(node.pos[0], node.pos[1] + w.y);
            const [right, bottom] = toScreen(node.pos[0] + node.size[0], node.pos[1] + w.y + (w.computedHeight ?? 20));
            return { name: w.name, left, top, right, bottom };
        });
        let [nodeLeft, nodeTop] = toScreen(node.pos[0], node.pos[1]);
        let [nodeRight, nodeBottom] = toScreen(node.pos[0] + node.size[0], node.pos[1] + node.size[1]);
        const element = document.querySelector(`[data-node-id="${id}"]`);  // Nodes 2.0: the node's own box
        if (element) ({ left: nodeLeft, top: nodeTop, right: nodeRight, bottom: nodeBottom } =
                      element.getBoundingClientRect());
        const parts = node.loraLabPanel, message = parts.message;
        return { status: parts.status.dataset.status, shown: parts.status.textContent,
                 numbers: parts.numbers.textContent, message: message.textContent,
                 messageFits: message.scrollWidth <= message.clientWidth + 1,
                 messageRect: message.getBoundingClientRect().toJSON(), points: Number(parts.chart.dataset.points),
                 panel: panel.toJSON(), widgets,
                 node: { left: nodeLeft, top: nodeTop, right: nodeRight, bottom: nodeBottom } };
    }""", node_id)


def image_scale(page, node_id: int) -> float:
    """How much a node's first picture is scaled (canvas units per image pixel): in Nodes 2.0 from
    the picture's own element, on the classic canvas from the space below the top of the
    frontend's image preview widget (`$$canvas-image-preview`, whose renderPreview draws from its y
    to the node's bottom in ComfyUI_frontend's useNodeCanvasImagePreview), or below the other
    widgets before it exists."""
    return page.evaluate("""(id) => {
        const node = window.app.graph.getNodeById(id), image = node.imgs[0];
        const shown = [...document.querySelectorAll('img')].find((img) => img.src === image.src
            && img.naturalWidth > 0 && img.getBoundingClientRect().width > 0);
        if (shown) return shown.getBoundingClientRect().width / shown.naturalWidth / window.app.canvas.ds.scale;
        if (!image.naturalWidth) return 0;
        const preview = node.widgets.find((w) => w.name === '$$canvas-image-preview');
        const others = node.widgets.filter((w) => w !== preview);
        const bottom = preview?.y ?? Math.max(...others.map((w) => (w.y ?? 0) + (w.computedHeight ?? 20)));
        return Math.min((node.size[0] - 20) / image.naturalWidth, (node.size[1] - bottom) / image.naturalHeight);
    }""", node_id)


def grid_cell_on_screen(page, node_id: int, zoom: float, cell_pixels: int = 256) -> float:
    """How wide one grid cell is drawn at canvas zoom `zoom`."""
    return cell_pixels * image_scale(page, node_id) * zoom


def grid_facts(page, node_id: int) -> dict:
    """A grid node's cells and labels as drawn: the number of cells, the smallest cell's side and
    the smallest label font on screen, and how many labels are cut (row, column and corner)."""
    return page.evaluate("""(id) => {
        const root = window.app.graph.getNodeById(id).loraLabGrid.root;
        const cells = [...root.querySelectorAll('.lora-lab-grid-cell')].map((c) => c.getBoundingClientRect());
        const labels = [...root.children].filter((el) => el.tagName === 'DIV');
        const rows = [...root.querySelectorAll('.lora-lab-grid-label')];
        const font = (el) => parseFloat(getComputedStyle(el).fontSize) * el.getBoundingClientRect().height
                             / el.offsetHeight;
        const box = root.getBoundingClientRect();
        return { cells: cells.length, smallest: Math.min(...cells.map((c) => Math.min(c.width, c.height))),
                 label: Math.min(...rows.map(font)), clipped: labels.filter((l) => l.scrollWidth > l.clientWidth + 1
                 || l.scrollHeight > l.clientHeight + 1).length,
                 outside: [...root.children].filter((el) => { const r = el.getBoundingClientRect();
                           return r.bottom > box.bottom + 1 || r.right > box.right + 1; }).length,
                 texts: labels.map((l) => l.textContent) };
    }""", node_id)


def intersects(a: dict, b: dict) -> bool:
    return (a["left"] < b["right"] - 1 and b["left"] < a["right"] - 1
            and a["top"] < b["bottom"] - 1 and b["top"] < a["bottom"] - 1)


def small_sd15_example(page) -> None:
    load_workflow(page, json.loads(example_path(TRAIN_AND_TEST).read_text()))
    set_widgets(page, 1, {"ckpt_name": CHECKPOINT})
    set_widgets(page, 2, {"folder": "concept", "trigger_word": "zkw_toy"})  # typed once: Caption reads it
    set_widgets(page, 4, {**SMALL_TRAINING, "name": "browser_run"})
    set_widgets(page, 5, {"width": 64, "height": 64, "steps": 2, "strengths": "0, 1", "prompts": "{trigger}"})
    set_widgets(page, 9, {"width": 64, "height": 64})
    set_widgets(page, 10, {"steps": 2})


def wait_status(page, statuses: tuple[str, ...], timeout: float = 600, node_id: int = 4) -> dict:
    page.wait_for_function("([statuses, id]) => statuses.includes(window.app.graph.getNodeById(id)?.loraLabPanel"
                           "?.status.dataset.status)", arg=[list(statuses), node_id], timeout=timeout * 1000)
    return panel_state(page, node_id)


def test_the_sd15_example_opens_with_its_main_path_and_panel_in_view(page, server, screenshots):
    """As the example opens: the dataset and training nodes on screen at a readable zoom, Train LoRA's
    panel near its top with the plan line saying what each 0 becomes, the folded settings a click
    away and keeping their values."""
    page, _ = page
    load_workflow(page, json.loads(example_path(TRAIN_AND_TEST).read_text()))
    page.wait_for_function("() => window.app.graph.getNodeById(4).loraLabPanel.plan.textContent.length > 0",
                           timeout=30_000)
    shot(page, screenshots, "example-opened", "the SD 1.5 example as it opens")
    view = page.evaluate("""() => {
        const canvas = window.app.canvas, bounds = canvas.canvas.getBoundingClientRect();
        const onScreen = (node) => {
            const left = bounds.left + (node.pos[0] + canvas.ds.offset[0]) * canvas.ds.scale;
            const top = bounds.top + (node.pos[1] + canvas.ds.offset[1]) * canvas.ds.scale;
            return left >= bounds.left - 1 && left < bounds.right && top >= bounds.top - 1 && top < bounds.bottom;
        };
        const train = window.app.graph.getNodeById(4), panel = train.loraLabPanel;
        const rect = panel.root.getBoundingClientRect();
        // The panel's distance from the node's top, in canvas units: from the node's own element in
        // Nodes 2.0, else from where the canvas lays the widget out.
        const element = document.querySelector('[data-node-id="4"]');
        const panelTop = element ? (rect.top - element.getBoundingClientRect().top) / canvas.ds.scale
                                 : train.widgets.find((w) => w.name === 'lora_lab_panel').y;
        return { scale: canvas.ds.scale, shown: [2, 3, 4].map((id) => onScreen(window.app.graph.getNodeById(id))),
                 panelTop, nodeHeight: train.size[1], plan: panel.plan.textContent,
                 panelInView: rect.top >= bounds.top && rect.bottom <= window.innerHeight + 1,
                 visible: train.widgets.filter((w) => train.isWidgetVisible(w) && w.serialize !== false).length,
                 values: train.widgets.filter((w) => w.serialize !== false).map((w) => w.value) };
    }""")
    print(f"opens at {view['scale']:.0%}; Train LoRA's panel starts {view['panelTop']:.0f} px below the node's top "
          f"({view['nodeHeight']:.0f} px node), {view['visible']} widgets in view; plan: {view['plan']}")
    assert view["scale"] >= 0.8 and all(view["shown"]) and view["panelInView"]
    # Nine essential rows above it (Nodes 2.0 draws its rows taller than the classic canvas).
    assert view["panelTop"] <= 480 and view["visible"] <= 10
    assert "from the" in view["plan"] and "1e-4" in view["plan"] and "px" in view["plan"]
    page.locator(".lora-lab-more").first.click()
    unfolded = page.evaluate("() => { const n = window.app.graph.getNodeById(4); return [n.widgets.filter((w) => "
                             "n.isWidgetVisible(w) && w.serialize !== false).length, n.widgets.filter((w) => "
                             "w.serialize !== false).map((w) => w.value)]; }")
    shot(page, screenshots, "train-lora-unfolded", "Train LoRA with all its settings shown")
    assert unfolded[0] == len(view["values"]) and unfolded[1] == view["values"]  # the same values, all shown


def test_sd15_example_trains_with_a_panel_people_can_read(page, server, browser, screenshots):
    page, errors = page
    small_sd15_example(page)
    fit_view(page, 0.8)
    page.evaluate("() => { const c = window.app.canvas; c.ds.offset = [-500, -330]; c.setDirty(true, true); }")
    queued = time.time()
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("() => Number(window.app.graph.getNodeById(4).loraLabPanel.chart.dataset.points) > 0",
                           timeout=300_000)
    print(f"seconds from Queue to the first loss point on the panel: {time.time() - queued:.1f}")
    page.wait_for_function("() => Number(window.app.graph.getNodeById(4).loraLabPanel.chart.dataset.points) >= 8",
                           timeout=300_000)
    state = panel_state(page)
    shot(page, screenshots, "training", f"the panel while training: {state['numbers']}")
    assert state["status"] == "training" and "step" in state["numbers"] and "loss" in state["numbers"]
    if not VUE_NODES:  # Nodes 2.0 lays the node out as its own page elements, one under another
        covered = [w["name"] for w in state["widgets"] if intersects(w, state["panel"])]
        assert not covered, covered
    assert state["panel"]["bottom"] <= state["node"]["bottom"] + 1 and state["panel"]["top"] >= state["node"]["top"]
    # Load Dataset's sheet of flagged images (the concept set's images are all below 512 px) has room.
    page.wait_for_function("() => window.app.nodeOutputs?.['2']?.images?.length", timeout=60_000)
    fit_view(page, node_ids=[2])  # the canvas loads a node's pictures when it first draws the node on screen
    page.wait_for_function("() => (window.app.graph.getNodeById(2).imgs ?? []).some((img) => img.naturalWidth > 0)",
                           timeout=60_000)
    sheet_label = 13 * image_scale(page, 2)  # the sheet's label font, in canvas units
    shot(page, screenshots, "dataset-sheet", f"Load Dataset's report and flagged images (labels {sheet_label:.0f} "
                                             "px at 100 %)")
    print(f"Load Dataset's sheet labels are {sheet_label:.1f} px at 100 % zoom")
    assert math.isfinite(sheet_label) and sheet_label >= 9
    # A reload in the middle of the run: the whole curve comes back from the run folder.
    page.reload()
    page.wait_for_function("() => window.app?.graph?.getNodeById(4)?.loraLabPanel", timeout=120_000)
    page.wait_for_function("(before) => { const data = window.app.graph.getNodeById(4).loraLabPanel.chart.dataset;"
                           " return Number(data.points) > before && Number(data.points) === Number(data.last); }",
                           arg=state["points"], timeout=60_000)  # steps missed while away are filled in
    fit_view(page, 0.8)
    page.evaluate("() => { const c = window.app.canvas; c.ds.offset = [-500, -330]; c.setDirty(true, true); }")
    # Read together: the run trains on, so points and last read apart can be a step apart.
    points, first, last = page.evaluate("() => ['points', 'first', 'last'].map((key) => Number(window.app.graph"
                                        ".getNodeById(4).loraLabPanel.chart.dataset[key]))")
    shot(page, screenshots, "reloaded", f"after a reload mid-run: {points} points, steps {first} to {last}")
    assert first == 1 and points == last  # the whole curve, no step missing
    # Cancel: a checkpoint is saved and the panel says how to continue, inside the node.
    page.evaluate("() => fetch('/api/interrupt', {method: 'POST'})")
    stopped = wait_status(page, ("stopped",))
    shot(page, screenshots, "stopped", f"after Cancel: {stopped['message']}")
    assert "resume to 'latest'" in stopped["message"] and stopped["messageFits"]
    assert stopped["messageRect"]["right"] <= stopped["node"]["right"] + 1
    assert stopped["messageRect"]["bottom"] <= stopped["node"]["bottom"] + 1
    # Resume and finish: the grid and the loss curve are shown, nothing covers them.
    set_widgets(page, 4, {"resume": "latest"})
    page.evaluate("() => { window.loraLabPhases = []; (window.app.api ?? window.comfyAPI?.api?.api)"
                  ".addEventListener('lora_lab.phase', ({ detail }) => window.loraLabPhases.push(detail.phase)); }")
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    # 30 steps with validation every 2 and samples: about 10 minutes on 2 shared cores (0.33.0's torch
    # with Nodes 2.0 is the slowest pairing measured, 15 s a step with everything in it).
    finished = wait_status(page, ("finished", "failed"), timeout=1200)
    assert finished["status"] == "finished", finished["message"]
    page.wait_for_function("() => [5, 12].every((id) => window.app.nodeOutputs?.[String(id)])", timeout=300_000)
    fit_view(page)  # the canvas loads a node's pictures when it first draws the node on screen
    page.wait_for_function("() => (window.app.graph.getNodeById(12).imgs ?? []).some((img) => img.naturalWidth > 0)"
                           " && [...document.querySelectorAll('.lora-lab-grid-cell')].length > 0 && [...document"
                           ".querySelectorAll('.lora-lab-grid-cell')].every((img) => img.naturalWidth > 0)",
                           timeout=60_000)
    shot(page, screenshots, "finished", "after the run: panel finished, the grid on Sample Checkpoint, what Apply "
                                        "LoRA Stack applied, the image on Save Image")
    facts = node_facts(page)
    assert not overlaps(facts)
    texts = page.evaluate("() => [2, 3].map((id) => window.app.graph.getNodeById(id).loraLabText.textContent)"
                          ".concat([window.app.graph.getNodeById(5).loraLabCells.text.textContent])")
    print(f"Load Dataset shows: {texts[0]!r}; Caption shows: {texts[1][:80]!r}...; Sample Checkpoint: {texts[2]!r}")
    assert texts[0].startswith(("Ready to train", "1 problem", "2 problem")) and "12 images" in texts[0]
    assert texts[1].count(": zkw_toy,") == 12  # "name: caption" lines
    # Every checkpoint of the run, the one saved at Cancel too, at strength 1; strength 0 once.
    saved = server.get("/lora_lab/run?name=browser_run")["run"]["checkpoints"]
    assert len(saved) >= 2 and texts[2].startswith(f"All {1 + len(saved)} cells sampled")
    applied = page.evaluate("() => window.app.graph.getNodeById(6).loraLabText.textContent")
    assert "browser_run" in applied and "recommended" in applied and "model 0.70, clip 0.70" in applied, applied
    phases = page.evaluate("() => window.loraLabPhases")
    assert "saving" in phases, phases  # the panel said "saving…" between steps
    # The grid on the node, at the zoom the example opens at: cells and labels people can read.
    zoom = json.loads(example_path(TRAIN_AND_TEST).read_text())["extra"]["ds"]["scale"]
    fit_view(page, zoom, node_ids=[5])
    grid = grid_facts(page, 5)
    shot(page, screenshots, "grid-on-node", f"Sample Checkpoint's grid at the example's zoom ({zoom:.0%})")
    print(f"grid on the node at {zoom:.0%}: {grid['cells']} cells, smallest {grid['smallest']:.0f} px, labels "
          f"{grid['label']:.1f} px on screen")
    assert grid["cells"] == 2 * len(saved)  # a row per checkpoint, strengths 0 and 1
    assert grid["smallest"] >= 128 and grid["label"] >= 11 and grid["clipped"] == grid["outside"] == 0
    page.locator(".lora-lab-grid-cell").first.click()
    page.wait_for_selector(".lora-lab-full-size img", timeout=10_000)
    full = page.evaluate("() => document.querySelector('.lora-lab-full-size img').getBoundingClientRect().width")
    shot(page, screenshots, "grid-cell-full-size", "a grid cell opened full size")
    page.keyboard.press("Escape")
    assert full > grid["smallest"] and page.locator(".lora-lab-full-size").count() == 0
    assert not errors.ours()


def test_model_library_shows_the_loras_thumbnail_and_trigger_phrase(page, server, screenshots):
    """The run's LoRA as ComfyUI's Model Library shows it (after the training test's run)."""
    page, _ = page
    run = next((server.base / "models" / "loras" / "lora_lab").glob("browser_run"), None)
    if run is None:
        pytest.skip("needs the training test's run")
    commands = page.evaluate("() => window.app.extensionManager.command.commands.map((c) => c.id)")
    if "Workspace.ToggleSidebarTab.model-library" not in commands:
        pytest.skip("this frontend has no Model Library sidebar")
    page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.model-library')")
    for folder in ("loras", "lora_lab", "browser_run"):
        page.get_by_text(folder, exact=True).first.click()
        page.wait_for_timeout(800)
    page.get_by_text("browser_run", exact=True).last.hover()
    page.wait_for_function("() => [...document.querySelectorAll('img')].some((img) => img.src.startsWith("
                           "'data:image/jpeg') && img.naturalWidth > 0)", timeout=15_000)
    shot(page, screenshots, "model-library", "the Model Library's preview of the trained LoRA")
    assert page.get_by_text("zkw_toy", exact=False).count() > 0  # the trigger phrase (and the usage hint)


def test_lora_name_links_to_core_lora_loader(page, server):
    page, _ = page
    load_workflow(page, json.loads(example_path(TRAIN_AND_TEST).read_text()))
    linked = page.evaluate("""() => {
        const train = window.app.graph.getNodeById(4);
        const loader = window.LiteGraph.createNode('LoraLoader');
        window.app.graph.add(loader);
        const slot = loader.inputs.findIndex((input) => input.name === 'lora_name');
        train.connect(4, loader, slot);
        return loader.inputs[slot].link != null;
    }""")
    assert linked


def test_a_train_node_in_a_subgraph_gets_its_panel(page, server, screenshots):
    page, _ = page
    small_sd15_example(page)
    set_widgets(page, 4, {**SMALL_TRAINING, "steps": 6, "save_every": 3, "name": "in_subgraph"})
    made = page.evaluate("""() => {
        const graph = window.app.graph, train = graph.getNodeById(4);
        if (!graph.convertToSubgraph) return null;
        const { node } = graph.convertToSubgraph(new Set([train]));
        return node.id;
    }""")
    if made is None:
        pytest.skip("this frontend has no subgraphs")
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    execution_id = f"{made}:4"
    page.wait_for_function("""(id) => {
        const [outer, inner] = id.split(':').map(Number);
        const node = window.app.graph.getNodeById(outer)?.subgraph?.getNodeById(inner);
        return node?.loraLabPanel?.status.dataset.status === 'finished';
    }""", arg=execution_id, timeout=600_000)
    page.evaluate("""(outer) => { window.app.canvas.setGraph(window.app.graph.getNodeById(outer).subgraph); }""", made)
    fit_view(page)
    shot(page, screenshots, "subgraph", f"Train LoRA inside a subgraph ({execution_id}) after its run")


def test_a_background_run_shows_after_a_reload_and_its_stop_button_saves(page, server, screenshots):
    """Train LoRA with background on: the queue is free at once, the panel follows the job across a
    reload (any tab), and its Stop button stops the job with a checkpoint that resumes."""
    page, _ = page
    small_sd15_example(page)
    set_widgets(page, 4, {**SMALL_TRAINING, "steps": 2000, "save_every": 1000, "name": "browser_background",
                          "background": True})
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    # The panel first shows this node's earlier run (from the run folder): wait for the job's own steps.
    following_the_job = ("() => { const p = window.app.graph.getNodeById(4).loraLabPanel;"
                         " return p.numbers.textContent.startsWith('browser_background ')"
                         " && Number(p.chart.dataset.last) >= 3 && p.stop.style.display !== 'none'"
                         " && ['training', 'paused'].includes(p.status.dataset.status); }")
    page.wait_for_function(following_the_job, timeout=300_000)
    page.reload()
    page.wait_for_function("() => window.app?.graph?.getNodeById(4)?.loraLabPanel", timeout=120_000)
    page.wait_for_function(following_the_job, timeout=60_000)
    fit_view(page, 0.8)
    page.evaluate("() => { const c = window.app.canvas; c.ds.offset = [-500, -330]; c.setDirty(true, true); }")
    # Nodes 2.0 moves its node boxes on the next frames: measure once they have moved.
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    state = panel_state(page)
    shot(page, screenshots, "background", f"a background run after a reload: {state['numbers']}")
    assert "/ 2000" in state["numbers"]  # the job's state came back from the server after the reload
    button = page.locator(".lora-lab-stop").first
    box = button.bounding_box()
    assert button.is_visible()
    assert box and state["node"]["left"] <= box["x"] and box["x"] + box["width"] <= state["node"]["right"] + 1
    button.click()
    stopped = wait_status(page, ("stopped", "failed"), timeout=120)
    shot(page, screenshots, "background-stopped", f"after Stop: {stopped['message']}")
    assert stopped["status"] == "stopped" and "resume to 'latest'" in stopped["message"]
    assert page.evaluate("() => window.app.graph.getNodeById(4).loraLabPanel.stop.style.display") == "none"
    run_dir = server.base / "models" / "loras" / "lora_lab" / "browser_background"
    assert list(run_dir.glob("browser_background-step*.resume"))


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory):
    """A second server with the FLUX install of the FLUX tier (tests/comfy_server.flux_install)."""
    base = tmp_path_factory.mktemp("comfy_browser_flux")
    files = flux_install(base, os.environ.get("LORA_LAB_FLUX_MODELS"), tmp_path_factory.mktemp("flux_models"))
    comfy = ComfyServer(Path(COMFYUI_DIR), base, comfy_python(Path(COMFYUI_DIR)), frontend_args())
    comfy.start()
    yield comfy, files
    comfy.stop()


def test_the_flux_example_trains_samples_and_stacks_in_the_browser(browser, flux_server, screenshots):
    """The shipped FLUX example, only file names and step counts changed: Train LoRA's panel shows
    its plan, step and loss; at the end Sample Checkpoint's grid, what the stack applied and the
    user's sampler's image are on the nodes, none covering another."""
    server, files = flux_server
    page, errors = open_comfyui(browser, server.url, SETTINGS)
    load_workflow(page, json.loads(example_path(TRAIN_FLUX).read_text()))
    set_widgets(page, 1, {"unet_name": files["transformer"].name})
    set_widgets(page, 2, {"clip_name1": files["clip_l"].name, "clip_name2": files["t5"].name})
    set_widgets(page, 6, {"steps": 4, "save_every": 2, "resolution": 64, "name": "browser_flux"})
    set_widgets(page, 7, {"width": 64, "height": 64, "steps": 2, "strengths": "0, 0.7",
                          "prompts": "{trigger}, portrait photo in a garden"})
    set_widgets(page, 14, {"width": 64, "height": 64})
    set_widgets(page, 15, {"steps": 2})
    page.wait_for_function("() => window.app.graph.getNodeById(6).loraLabPanel.plan.textContent.length > 0",
                           timeout=30_000)
    plan = page.evaluate("() => window.app.graph.getNodeById(6).loraLabPanel.plan.textContent")
    fit_view(page, node_ids=[6, 7])
    shot(page, screenshots, "flux-opened", f"the FLUX example before Queue; plan: {plan}")
    assert "character preset" in plan, plan  # from Load Dataset's lora_type
    queued = time.time()
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    # Two captions through the full-size T5-XXL (20-45 s each on 2 cores) before the first step.
    page.wait_for_function("() => Number(window.app.graph.getNodeById(6).loraLabPanel.chart.dataset.points) > 0",
                           timeout=900_000)
    state = panel_state(page, 6)
    print(f"seconds from Queue to the first loss point: {time.time() - queued:.0f}")
    shot(page, screenshots, "flux-training", f"the FLUX panel while training: {state['numbers']}")
    assert state["status"] == "training" and "step" in state["numbers"] and "loss" in state["numbers"]
    if not VUE_NODES:
        covered = [w["name"] for w in state["widgets"] if intersects(w, state["panel"])]
        assert not covered, covered
    finished = wait_status(page, ("finished", "failed"), timeout=1500, node_id=6)
    assert finished["status"] == "finished", finished["message"]
    page.wait_for_function("() => [7, 17].every((id) => window.app.nodeOutputs?.[String(id)])", timeout=900_000)
    fit_view(page)
    page.wait_for_function("() => (window.app.graph.getNodeById(17).imgs ?? []).some((img) => img.naturalWidth > 0)"
                           " && [...document.querySelectorAll('.lora-lab-grid-cell')].length > 0 && [...document"
                           ".querySelectorAll('.lora-lab-grid-cell')].every((img) => img.naturalWidth > 0)",
                           timeout=60_000)
    print(f"seconds from Queue to the finished example: {time.time() - queued:.0f}")
    shot(page, screenshots, "flux-finished", "the FLUX example after its run: the panel, the grid, what the stack "
                                             "applied, the user's image")
    assert not overlaps(node_facts(page))
    cells = page.evaluate("() => document.querySelectorAll('.lora-lab-grid-cell').length")
    applied = page.evaluate("() => window.app.graph.getNodeById(9).loraLabText.textContent")
    assert cells == 4  # steps 2 and 4 at strengths 0 and 0.7
    assert "browser_flux" in applied and "model 0.70" in applied, applied
    fit_view(page, node_ids=[6, 7])
    shot(page, screenshots, "flux-panel-finished", f"the FLUX panel at the end: {finished['message']}")
    assert not errors.ours(), errors.ours()
    page.close()


def drop_file(page, path: Path) -> None:
    """Drop a file onto the page as a person drags it from their file manager (a synthetic drop
    event with the file in its DataTransfer; the frontend's drop handler takes it from there)."""
    import base64

    page.evaluate("""([name, data]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "application/octet-stream" }));
        const target = document.querySelector("canvas") ?? document.body;
        target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }""", [path.name, base64.b64encode(path.read_bytes()).decode()])


def widget_values(facts: list[dict], node_type: str) -> dict:
    node = next(f for f in facts if f["type"] == node_type)
    return {w["name"]: w["value"] for w in node["widgets"] if w["serialize"]}


def test_a_dropped_lora_opens_the_graph_that_trained_it(page, browser, server, screenshots, tmp_path):
    """A checkpoint trained from the SD 1.5 example, dropped onto a fresh page, opens that example
    with its values; one trained from the command line opens a graph that trains what it trained."""
    page, _ = page
    small_sd15_example(page)
    set_widgets(page, 4, {"steps": 4, "save_every": 2, "name": "dropped_run", "sample_every": -1,
                          "validation_images": -1})
    queued = {kind: widget_values(node_facts(page), kind) for kind in ("LoraLabLoadDataset", "LoraLabTrainLora")}
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    assert wait_status(page, ("finished", "failed"))["status"] == "finished"
    checkpoint = server.base / "models" / "loras" / "lora_lab" / "dropped_run" / "dropped_run-step000002.safetensors"
    fresh, errors = open_comfyui(browser, server.url, SETTINGS)
    drop_file(fresh, checkpoint)
    fresh.wait_for_function("() => window.app.graph._nodes.some((n) => n.type === 'LoraLabTrainLora')", timeout=30_000)
    fit_view(fresh)
    shot(fresh, screenshots, "dropped-lora-opened", f"{checkpoint.name} dropped onto a fresh page: its training graph")
    facts = node_facts(fresh)
    assert len(facts) == len(node_facts(page))  # the whole example, not only Train LoRA
    for kind, values in queued.items():
        assert widget_values(facts, kind) == values, kind
    fresh.close()
    assert not errors.ours(), errors.ours()

    from lora_lab.trainer.config import build_config
    from lora_lab.trainer.run import train_lora

    cli = train_lora(build_config({"output_dir": str(tmp_path), "name": "from_cli", "steps": 2, "rank": 4,
                                   "resolution": 64, "sample_every": -1, "validation_images": -1,
                                   "trigger_word": "zkw_toy"}))
    fresh, errors = open_comfyui(browser, server.url, SETTINGS)
    drop_file(fresh, cli.final_path)
    fresh.wait_for_function("() => window.app.graph._nodes.some((n) => n.type === 'LoraLabTrainLora')", timeout=30_000)
    fit_view(fresh)
    shot(fresh, screenshots, "dropped-cli-lora-opened", "a LoRA trained from the command line, dropped: the graph "
                                                        "its config describes, laid out by the frontend")
    facts = node_facts(fresh)
    train = widget_values(facts, "LoraLabTrainLora")
    assert (train["name"], train["steps"], train["rank"], train["resolution"]) == ("from_cli", 2, 4, 64)
    assert widget_values(facts, "LoraLabLoadDataset")["trigger_word"] == "zkw_toy"
    assert {f["type"] for f in facts} >= {"CheckpointLoaderSimple", "LoraLabLoadDataset", "LoraLabSampleCheckpoint"}
    fresh.close()
    assert not errors.ours(), errors.ours()


def test_the_stacking_grid_of_two_trained_loras_reads_on_the_node(browser, server, screenshots):
    """The Stack two LoRAs example with two LoRAs trained on the SD 1.5 checkpoint: Compare LoRA
    Stack's grid (the guide's 4 x 4 strengths) is on the node at the example's zoom with cells of
    at least 128 px and no label cut."""
    loras = []
    for name, trigger, seed in (("stack_ring", "zkw_ring", 1), ("stack_blue", "zkw_blue", 2)):
        prompt_id, _ = server.run(small_training(CHECKPOINT, name, trigger, seed))
        assert server.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success"
        loras.append(f"lora_lab/{name}/{name}.safetensors")
    page, errors = open_comfyui(browser, server.url, SETTINGS)  # opened after training: the lists hold them
    example = json.loads(example_path(STACK_TWO).read_text())
    load_workflow(page, example)
    set_widgets(page, 1, {"ckpt_name": CHECKPOINT})
    set_widgets(page, 2, {"lora_1": loras[0], "lora_2": loras[1]})
    set_widgets(page, 5, {"width": 64, "height": 64})
    set_widgets(page, 6, {"steps": 2})
    set_widgets(page, 11, {"width": 64, "height": 64, "steps": 2})
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("() => [8, 11].every((id) => window.app.nodeOutputs?.[String(id)])", timeout=600_000)
    page.set_viewport_size({"width": 1600, "height": 1400})  # the whole node on screen at the example's zoom
    fit_view(page, example["extra"]["ds"]["scale"], node_ids=[11])
    page.wait_for_function("() => { const cells = [...document.querySelectorAll('.lora-lab-grid-cell')];"
                           " return cells.length > 0 && cells.every((img) => img.naturalWidth > 0); }",
                           timeout=60_000)
    grid = grid_facts(page, 11)
    progress = page.evaluate("() => window.app.graph.getNodeById(11).loraLabCells.text.textContent")
    shot(page, screenshots, "stack-grid", f"Compare LoRA Stack: {loras[0]} in columns, {loras[1]} in rows, at the "
                                          "example's zoom")
    print(f"stacking grid: {grid['cells']} cells, smallest {grid['smallest']:.0f} px, labels {grid['label']:.1f} "
          f"px on screen; {progress}")
    assert grid["cells"] == 16 and progress.startswith("All 16 cells sampled")
    assert grid["smallest"] >= 128 and grid["label"] >= 11 and grid["clipped"] == grid["outside"] == 0
    assert grid["texts"][1:5] == ["stack_ring off", "stack_ring 0.6", "stack_ring 0.7", "stack_ring 0.8"]
    assert "stack_blue off" in grid["texts"] and "stack_blue 0.6" in grid["texts"]
    assert not overlaps(node_facts(page))
    page.close()
    assert not errors.ours(), errors.ours()


def test_load_dataset_reports_a_regularisation_set_and_a_set_with_masks(page, server, screenshots):
    """Load Dataset on its own (it is an output node): the report of a set of class images (one
    caption has the trigger word: training would stop) and of a set with masks (one empty, one of
    another size), read on the node."""
    import random

    from lora_lab.trainer.embedded import synthetic
    from PIL import Image

    page, errors = page
    rng = random.Random(4)
    reg, masked = server.base / "input" / "class_images", server.base / "input" / "masked"
    for folder in (reg, masked):
        folder.mkdir(exist_ok=True)
    for index in range(12):
        image, caption = synthetic.base_sample(rng)
        image.resize((512, 512)).save(reg / f"class_{index:02d}.png")
        (reg / f"class_{index:02d}.txt").write_text(("zkw_toy, " if index == 3 else "") + caption)
    for index in range(4):
        image, caption = synthetic.concept_sample(rng)
        image.resize((512, 512)).save(masked / f"toy_{index}.png")
        (masked / f"toy_{index}.txt").write_text(caption)
        side = 256 if index == 2 else 512
        mask = Image.new("L", (side, side), 0)
        if index != 1:
            mask.paste(255, (side // 8, side // 8, side * 7 // 8, side * 7 // 8))
        mask.save(masked / f"toy_{index}_mask.png")
    nodes = [{"id": id, "type": "LoraLabLoadDataset", "pos": [x, 60], "size": [480, 640], "flags": {}, "order": id,
              "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": values}
             for id, x, values in ((1, 40, ["class_images", "regularisation", "zkw_toy", ""]),
                                   (2, 560, ["masked", "style", "zkw_toy", ""]))]
    load_workflow(page, {"last_node_id": 2, "last_link_id": 0, "nodes": nodes, "links": [], "groups": [],
                         "config": {}, "extra": {}, "version": 0.4})
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("() => window.app.nodeOutputs?.['1']?.text && window.app.nodeOutputs?.['2']?.text",
                           timeout=120_000)
    reports = page.evaluate("() => [1, 2].map((id) => String(window.app.nodeOutputs[String(id)].text))")
    assert reports[0].startswith("Regularisation images (12)") and "1 problem(s) stop training" in reports[0]
    assert "contain the trigger word 'zkw_toy' (class_03.png)" in reports[0]
    assert "4 of 4 images have masks" in reports[1] and "1 mask(s) are empty (toy_1.png)" in reports[1]
    assert "1 mask(s) are of another size than their image (toy_2.png)" in reports[1]
    fit_view(page)
    time.sleep(1)
    shot(page, screenshots, "dataset-regularisation-and-masks", "Load Dataset's report for a regularisation set "
         "(left) and for a set with masks (right)")
