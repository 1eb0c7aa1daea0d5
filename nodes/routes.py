"""Routes on ComfyUI's server for the training panel (web/lora_lab.js): a run's state and whole loss
history, read from the files the trainer keeps in the run folder (trainer/history.py), so a
reloaded page or a second browser shows the same curve as the tab that queued the run; and the
background jobs (nodes/jobs.py).

    GET  /lora_lab/run?name=<run>   the run of that name
    GET  /lora_lab/run?node=<id>    the newest run started by that node ("5" or "5:3" in a subgraph)
    GET  /lora_lab/jobs             this server's background jobs, and runs a restart interrupted
    POST /lora_lab/jobs/stop        {"name": <run>}: stop that job; it saves a resumable checkpoint

The run routes answer {"run": <journal>, "losses": [[step, loss, lr], ...], "sample": <the newest
sample sheet as a data URL, or null>, "job": <the job's listing, or null>}; a node that has not
trained yet gets {"run": null} (not an error: every Train LoRA node asks when the page loads). A run
whose server stopped while it trained reads as "stopped", with how to resume. Bad queries get 400
and unknown names 404, each with {"error": ...}. Nothing outside the LoRA Lab folder under
models/loras is ever read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from ..trainer.history import journal_path, loss_log_path, read_journal, read_loss_log
from ..trainer.metadata import thumbnail_url
from . import comfy_bridge as comfy
from .jobs import JOBS, interrupted_message
from .panel_events import SAMPLE_PREVIEW_WIDTH

RUN_ROUTE = "/lora_lab/run"
JOBS_ROUTE = "/lora_lab/jobs"
STOP_ROUTE = "/lora_lab/jobs/stop"


def runs_folder() -> Path:
    return comfy.lora_root() / comfy.LORA_SUBFOLDER


def latest_sample(run_dir: Path, journal: dict[str, Any]) -> str | None:
    """The run's newest sample sheet as a small data URL, as the live panel shows it."""
    for sheet in reversed(journal.get("samples") or []):
        path = run_dir / str(sheet.get("file", ""))
        if path.parent == run_dir and path.name.endswith("-samples.png") and path.is_file():
            with Image.open(path) as picture:
                return thumbnail_url(picture, SAMPLE_PREVIEW_WIDTH)
    return None


def current_journal(run_dir: Path) -> dict[str, Any] | None:
    """A run's journal as it stands: one still "training" under a server that is gone reads as stopped."""
    journal = read_journal(journal_path(run_dir, run_dir.name))
    message = interrupted_message(journal) if journal else None
    return {**journal, "status": "stopped", "message": message} if message else journal


def run_answer(folder: Path, run_dir: Path) -> tuple[int, dict[str, Any]]:
    journal = current_journal(run_dir)
    if run_dir.parent.resolve() != folder.resolve() or journal is None:
        return 404, {"error": f"no run named {run_dir.name!r} in {folder}"}
    losses = loss_log_path(run_dir, run_dir.name)
    job = JOBS.named(run_dir.name)
    return 200, {"run": journal, "losses": read_loss_log(losses) if losses.is_file() else [],
                 "sample": latest_sample(run_dir, journal), "job": job.listing() if job else None}


def run_journals(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(run folder, journal) of every run in the LoRA Lab folder, by name."""
    for path in sorted(folder.glob("*/*-run.json")) if folder.is_dir() else []:
        journal = read_journal(path) if path.name == f"{path.parent.name}-run.json" else None
        if journal is not None:
            yield path.parent, journal


def newest_run_of_node(folder: Path, node: str) -> Path | None:
    """The run folder whose journal names `node` as its owner and was updated last."""
    owned = [(journal.get("updated", 0), run_dir) for run_dir, journal in run_journals(folder)
             if journal.get("owner", {}).get("node") == node]
    return max(owned)[1] if owned else None


def run_route(query: dict[str, str], folder: Path | None = None) -> tuple[int, dict[str, Any]]:
    folder = folder or runs_folder()
    if query.get("name"):
        name = query["name"]
        if "/" in name or "\\" in name or name.startswith("."):
            return 400, {"error": "a run name is one folder name"}
        return run_answer(folder, folder / name)
    if query.get("node"):
        run_dir = newest_run_of_node(folder, query["node"])
        return run_answer(folder, run_dir) if run_dir else (200, {"run": None, "losses": [], "sample": None,
                                                                  "job": None})
    return 400, {"error": "ask for ?name=<run> or ?node=<node id>"}


def jobs_route(query: dict[str, str], folder: Path | None = None) -> tuple[int, dict[str, Any]]:
    """This server's background jobs, newest last, then the runs a server stop interrupted."""
    folder = folder or runs_folder()
    listed = JOBS.listing()
    known = {job["name"] for job in listed}
    interrupted = []
    for run_dir, journal in run_journals(folder):
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
        return 404, {"error": f"no background job named {name!r} is running"}
    return 200, {"job": job.listing()}


_registered: list[str] = []


def register() -> None:
    """Add the routes once (a second call, e.g. from a reloaded extension, adds nothing)."""
    if RUN_ROUTE not in _registered:
        comfy.add_json_route(RUN_ROUTE, run_route)
        comfy.add_json_route(JOBS_ROUTE, jobs_route)
        comfy.add_json_route(STOP_ROUTE, stop_route, method="post")
        _registered.append(RUN_ROUTE)
