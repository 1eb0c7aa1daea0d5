"""Queue again, never train again: what Train LoRA makes of the runs already in the LoRA Lab folder.

ComfyUI keeps only the last prompt's outputs, so after another workflow or a restart it executes
Train LoRA again. The node then recognises its own runs on disk by their identity: the node's
settings, the dataset's fingerprint and LoRA type, and the base model's weights (a digest of the
tensors as loaded, so an upstream LoRA or another checkpoint is a different model). Each run's
journal records the identity it was trained with (`owner["identity"]`).

- A finished run of the same identity is handed on at once: nothing is trained, no folder made.
- A stopped run (Cancel, Stop, or a server that went away while it trained) of the same identity is
  never restarted behind the user's back: with resume off the node refuses and says how to
  continue it; with resume = latest it continues that run, whatever suffix its folder got.
- Otherwise a new run trains, in `name`, or `name_2`, ... when the name is taken, and the message
  says what differs from the newest run of that name.

Sample prompts and how often to sample change no weight, so they are not part of the identity
(a finished run is handed on with the samples it made). Nothing here imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..trainer.errors import LoraLabError
from ..trainer.history import runs_in
from ..trainer.resume import SUFFIX

NEW_RUN, LATEST = "off", "latest"
# Settings that say how the node runs or what it samples, not what it trains.
NOT_IDENTITY = ("resume", "resume_with_changes", "background", "prompts", "sample_every")


@dataclass(frozen=True)
class RunIdentity:
    settings: dict[str, Any]  # the node's settings as queued (widget values)
    dataset: str  # the dataset's fingerprint (files, captions, trigger word)
    lora_type: str
    model_name: str  # the model file, for messages
    model_key: str  # a digest of the base model's weights as loaded

    @property
    def key(self) -> str:
        trained = {name: value for name, value in self.settings.items() if name not in NOT_IDENTITY}
        text = json.dumps([trained, self.dataset, self.lora_type, self.model_key], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def record(self) -> dict[str, Any]:
        """What a run's journal keeps of its identity (owner["identity"])."""
        return {"key": self.key, "settings": self.settings, "dataset": self.dataset, "lora_type": self.lora_type,
                "model": self.model_name, "model_key": self.model_key}

    def changes_since(self, earlier: dict[str, Any]) -> list[str]:
        """What differs from an earlier run's identity record, as a user would say it."""
        old = earlier.get("settings") or {}
        changes = [f"{name}: {_short(old.get(name))} -> {_short(value)}" for name, value in self.settings.items()
                   if name not in NOT_IDENTITY and name in old and old[name] != value]
        if earlier.get("lora_type") != self.lora_type:
            changes.append(f"lora_type: {earlier.get('lora_type')} -> {self.lora_type}")
        if earlier.get("dataset") != self.dataset:
            changes.append("the dataset changed (images, captions or trigger word)")
        if earlier.get("model_key") != self.model_key:
            changes.append("the base model changed" + (f" ({earlier.get('model')} -> {self.model_name})"
                                                       if earlier.get("model") != self.model_name else ""))
        return changes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class RunPlan:
    name: str  # the run folder's name
    resume: str = ""  # "" (a new run), "latest", or the path of a resume file
    reuse: Path | None = None  # a finished run to hand on instead of training
    message: str = ""  # for the panel: why this run, or what changed
    refusal: str = ""  # why nothing may start (a stopped run of this identity waits for resume)
    running: bool = False  # a run of this identity trains now (a background job of this server)


def unique_name(folder: Path, name: str) -> str:
    """`name`, or `name_2`, `name_3`, ... so an earlier run is never overwritten."""
    candidate, number = name, 1
    while (folder / candidate).exists():
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def chosen_checkpoint(folder: Path, choice: str) -> Path:
    """A '<run>/<file>.resume' choice as a path, which must lie inside the LoRA Lab folder: the
    choice may come from a stranger's workflow."""
    root = folder.resolve()
    path = (folder / choice).resolve()
    if not path.is_relative_to(root) or path.suffix != SUFFIX or not path.is_file():
        raise LoraLabError(f"resume = {choice[:80]!r} is not a checkpoint of a run in the LoRA Lab folder "
                           f"({folder.parent.name}/{folder.name}); choose 'latest' or one of the listed checkpoints "
                           "(refresh the page to see new ones).")
    return path


def default_plan(folder: Path, name: str, resume: str) -> RunPlan:
    """Where a run goes when no run of its identity is on disk: a new folder, the named run's
    latest checkpoint, or a chosen checkpoint in its own run folder."""
    if resume == NEW_RUN:
        return RunPlan(unique_name(folder, name))
    if resume == LATEST:
        return RunPlan(name, resume=LATEST)
    path = chosen_checkpoint(folder, resume)
    return RunPlan(path.parent.name, resume=str(path))


def standing(journal: dict[str, Any], session: str) -> str:
    """finished, stopped (also: still "training" under a server that is gone), running, or failed."""
    status = journal.get("status")
    if status == "training":
        return "running" if (journal.get("owner") or {}).get("server") == session else "stopped"
    return status if status in ("finished", "stopped") else "failed"


def plan_run(folder: Path, identity: RunIdentity, resume: str, session: str) -> RunPlan:
    """What Train LoRA does with this identity, given the runs on disk (see the module docstring)."""
    name = str(identity.settings.get("name", ""))
    runs = sorted(((journal.get("updated", 0), run_dir, journal) for run_dir, journal in runs_in(folder)),
                  key=lambda row: row[0], reverse=True)
    same = [(run_dir, journal) for _, run_dir, journal in runs
            if (journal.get("owner") or {}).get("identity", {}).get("key") == identity.key]
    if resume in (NEW_RUN, LATEST):
        for run_dir, journal in same:
            state = standing(journal, session)
            if state == "finished":
                return RunPlan(run_dir.name, reuse=run_dir, message=(
                    f"Already trained with these settings, dataset and model: run {run_dir.name} is handed on "
                    "without training again. Change a setting (or the name) to train a new run."))
            saved = journal.get("checkpoints") or []
            if state == "stopped" and saved:
                if resume == LATEST:
                    return RunPlan(run_dir.name, resume=LATEST,
                                   message=f"Continuing run {run_dir.name} from step {saved[-1]['step']}.")
                return RunPlan(run_dir.name, refusal=(
                    f"Run {run_dir.name} has these settings, dataset and model and stopped at step "
                    f"{journal.get('step', saved[-1]['step'])} of {journal.get('total_steps')} (last checkpoint "
                    f"{saved[-1]['file']}). Set resume to 'latest' and queue again to continue it; to start "
                    "over instead, change the name."))
            if state == "running":  # a background job of this server: queued again, it is joined
                return RunPlan(run_dir.name, running=True, message=f"Run {run_dir.name} with these settings is "
                               "training now in the background.")
    plan = default_plan(folder, name, resume)
    if plan.resume:
        return plan
    earlier = next((journal for _, run_dir, journal in runs
                    if (journal.get("owner") or {}).get("identity", {}).get("settings", {}).get("name") == name), None)
    changes = identity.changes_since(earlier["owner"]["identity"]) if earlier else []
    message = f"New run {plan.name}" + (f" ({'; '.join(changes)}, since run {earlier['name']})." if changes else ".")
    return RunPlan(plan.name, message=message)
