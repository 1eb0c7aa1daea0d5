"""Routes on ComfyUI's server for the training panel (web/lora_lab.js): a run's state and whole loss
history, read from the files the trainer keeps in the run folder (trainer/history.py), so a
reloaded page or a second browser shows the same curve as the tab that queued the run; and the
background jobs (nodes/jobs.py).

    GET  /lora_lab/run?name=<run>   the run of that name
    GET  /lora_lab/run?node=<id>    the newest run started by that node ("5" or "5:3" in a subgraph)
    GET  /lora_lab/jobs             this server's background jobs, and runs a restart interrupted
    POST /lora_lab/jobs/stop        {"name": <run>}: stop that job; it saves a resumable checkpoint
    POST /lora_lab/plan             {"settings": <widget values as JSON>, ...}: the panel's plan line

The run routes answer {"run": <journal>, "losses": [[step, loss, lr], ...], "sample": <the newest
sample sheet as a data URL, or null>, "job": <the job's listing, or null>}; a node that has not
trained yet gets {"run": null} (not an error: every Train LoRA node asks when the page loads). A run
whose server stopped while it trained reads as "stopped", with how to resume. Bad queries get 400
and unknown names 404, each with {"error": ...}. Nothing outside the LoRA Lab folder under
models/loras is ever read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..trainer.history import loss_log_path, read_loss_log, runs_in
from ..trainer.metadata import thumbnail_url
from . import comfy_bridge as comfy
from .jobs import JOBS, interrupted_message
from .panel_events import SAMPLE_PREVIEW_WIDTH

RUN_ROUTE = "/lora_lab/run"
JOBS_ROUTE = "/lora_lab/jobs"
STOP_ROUTE = "/lora_lab/jobs/stop"
PLAN_ROUTE = "/lora_lab/plan"


def runs_folder() -> Path:
    return comfy.lora_root() / comfy.LORA_SUBFOLDER


def inside(folder: Path, path: Path) -> bool:
    """Whether `path`, with every link followed, lies in `folder`: nothing else is ever read."""
    return path.resolve().is_relative_to(folder.resolve())


def latest_sample(folder: Path, run_dir: Path, journal: dict[str, Any]) -> str | None:
    """The run's newest sample sheet as a small data URL, as the live panel shows it."""
    for sheet in reversed(journal.get("samples") or []):
        path = run_dir / str(sheet.get("file", ""))
        if path.parent == run_dir and path.name.endswith("-samples.png") and path.is_file() and inside(folder, path):
            with Image.open(path) as picture:
                return thumbnail_url(picture, SAMPLE_PREVIEW_WIDTH)
    return None


def current_journal(journal: dict[str, Any]) -> dict[str, Any]:
    """A run's journal as it stands: one still "training" under a server that is gone reads as stopped."""
    message = interrupted_message(journal)
    return {**journal, "status": "stopped", "message": message} if message else journal


def shown_name(name: str) -> str:
    """A name from a query, as an error reply may repeat it: short (a reply never echoes megabytes)."""
    return repr(name if len(name) <= 60 else name[:57] + "...")


def run_answer(folder: Path, run_dir: Path, journal: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    losses = loss_log_path(run_dir, run_dir.name)
    job = JOBS.named(run_dir.name)
    return 200, {"run": current_journal(journal),
                 "losses": read_loss_log(losses) if losses.is_file() and inside(folder, losses) else [],
                 "sample": latest_sample(folder, run_dir, journal), "job": job.listing() if job else None}


def newest_run_of_node(folder: Path, node: str) -> tuple[Path, dict[str, Any]] | None:
    """The run folder (and journal) whose journal names `node` as its owner and was updated last."""
    owned = [(journal.get("updated", 0), run_dir.name, run_dir, journal) for run_dir, journal in runs_in(folder)
             if journal.get("owner", {}).get("node") == node]
    return max(owned)[2:] if owned else None


def run_route(query: dict[str, str], folder: Path | None = None) -> tuple[int, dict[str, Any]]:
    folder = folder or runs_folder()
    if query.get("name"):
        name = query["name"]
        if "/" in name or "\\" in name or name.startswith(".") or len(name) > 255:
            return 400, {"error": "a run name is one folder name"}
        found = dict(runs_in(folder)).get(folder / name)
        if found is None:
            return 404, {"error": f"no run named {shown_name(name)} in {comfy.relative_to_comfy(folder)}"}
        return run_answer(folder, folder / name, found)
    if query.get("node"):
        found = newest_run_of_node(folder, query["node"])
        return run_answer(folder, *found) if found else (200, {"run": None, "losses": [], "sample": None,
                                                               "job": None})
    return 400, {"error": "ask for ?name=<run> or ?node=<node id>"}


def jobs_route(query: dict[str, str], folder: Path | None = None) -> tuple[int, dict[str, Any]]:
    """This server's background jobs, newest last, then the runs a server stop interrupted."""
    folder = folder or runs_folder()
    listed = JOBS.listing()
    known = {job["name"] for job in listed}
    interrupted = []
    for run_dir, journal in runs_in(folder):
        message = interrupted_message(journal) if run_dir.name not in known else None
        if message:
            interrupted.append({"name": journal["name"], "node": journal.get("owner", {}).get("node"),
                                "status": "stopped", "message": message, "step": journal.get("step"),
                                "total_steps": journal.get("total_steps"),
                                "checkpoints": journal.get("checkpoints", []), "interrupted": True})
    return 200, {"jobs": listed, "interrupted": interrupted}


def stop_route(query: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Stop a running job: it saves a resumable checkpoint at the end of its current step."""
    name = query.get("name", "")
    if not name:
        return 400, {"error": "say which job: {\"name\": <run>}"}
    job = JOBS.stop(name)
    if job is None:
        return 404, {"error": f"no background job named {shown_name(name)} is running"}
    return 200, {"job": job.listing()}


def plan_route(query: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """The panel's plan line: what the Train LoRA settings become before Queue (trainer/explain.py).
    Fields: settings (the node's widget values as JSON), lora_type, family and images (from the last
    run of the Load Dataset node upstream; empty when it has not run)."""
    from ..trainer.errors import LoraLabError
    from ..trainer.explain import plan_line
    from .load_dataset import REGULARISATION
    from .train_lora import node_settings

    if query.get("lora_type") == REGULARISATION:
        return 200, {"plan": "the dataset input has regularisation images: connect them to reg_dataset, and the "
                             "images to learn from to dataset"}
    text = query.get("settings", "")
    if len(text) > 100_000:
        return 400, {"error": "settings too long"}
    try:
        widgets = json.loads(text or "{}")
        images = int(query["images"]) if query.get("images") else None
        settings = node_settings(widgets if isinstance(widgets, dict) else {}, query.get("lora_type") or "none")
        return 200, {"plan": plan_line(settings, query.get("family", ""), images)}
    except (ValueError, RecursionError):
        return 400, {"error": "settings must be the node's widget values as a JSON object"}
    except LoraLabError as error:
        return 200, {"plan": str(error)}


_registered: list[str] = []


def register() -> None:
    """Add the routes once (a second call, e.g. from a reloaded extension, adds nothing)."""
    if RUN_ROUTE not in _registered:
        comfy.add_json_route(RUN_ROUTE, run_route)
        comfy.add_json_route(JOBS_ROUTE, jobs_route)
        comfy.add_json_route(STOP_ROUTE, stop_route, method="post")
        comfy.add_json_route(PLAN_ROUTE, plan_route, method="post")
        _registered.append(RUN_ROUTE)
