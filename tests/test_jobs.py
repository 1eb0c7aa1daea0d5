"""Background training jobs (nodes/jobs.py) without a server: a job's life (start, progress, stop
that saves, the same training joined rather than started twice, the listing), turns with prompts
at step boundaries that change nothing of the result, the RUN value and fingerprint that follow
new checkpoints, and a run that a server stop interrupted. The real server: test_comfyui_server.py."""

from __future__ import annotations

import copy
import threading
import time
import types

import pytest
import torch
from lora_lab.nodes.jobs import DeviceTurns, JobRegistry, Trainer, TrainingJob
from lora_lab.trainer.errors import LoraLabError
from lora_lab.trainer.run import train_lora
from safetensors.torch import load_file

QUICK = {"steps": 8, "save_every": 4, "rank": 4, "learning_rate": 1e-3, "sample_every": -1, "seed": 3}


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def job_of(name: str, key: str = "k") -> TrainingJob:
    return TrainingJob(name=name, key=key, settings_key=key, node="4", total_steps=QUICK["steps"])


def trainer_of(config, model, **kwargs) -> Trainer:
    return Trainer(lambda events: train_lora(config, events, model=model, owner={"node": "4"}), **kwargs)


def test_a_job_trains_reports_and_is_not_started_twice(make_config, fresh_model, base_model):
    registry, sent = JobRegistry(DeviceTurns()), []
    config = make_config(**QUICK, name="bg")
    job = registry.start(job_of("bg"), trainer_of(config, fresh_model), lambda event, data: sent.append((event, data)))
    # The same training queued again while it runs joins it; another one is refused, naming it.
    assert registry.start(job_of("bg"), trainer_of(config, fresh_model), sent.append) is job
    with pytest.raises(LoraLabError, match="'bg' is running .*Stop it on its Train LoRA panel"):
        registry.start(job_of("other", key="k2"), trainer_of(config, fresh_model), sent.append)
    assert job.done.wait(300)
    assert job.status == "finished" and [step for step, _ in job.checkpoints] == [4, 8]
    assert "Recommended checkpoint" in job.message and job.best_step in (4, 8)
    assert [data["step"] for event, data in sent if event == "lora_lab.progress"] == list(range(1, 9))
    statuses = [data["status"] for event, data in sent if event == "lora_lab.status"]
    assert statuses[0] == "training" and statuses[-1] == "finished"
    assert all(data["background"] for event, data in sent if event == "lora_lab.status")
    assert all(data["node"] == "4" and data["run"] == "bg" for _, data in sent)
    listed = registry.listing()
    assert [(j["name"], j["status"], j["step"], [c["step"] for c in j["checkpoints"]]) for j in listed] == [
        ("bg", "finished", 8, [4, 8])]
    assert registry.start(job_of("bg"), trainer_of(config, fresh_model), sent.append) is job  # finished: its result
    assert len(registry.jobs) == 1


def test_stop_saves_a_checkpoint_that_resumes(make_config, fresh_model, base_model):
    registry = JobRegistry(DeviceTurns())
    config = make_config(**{**QUICK, "steps": 200, "save_every": 100}, name="stopme")
    job = registry.start(job_of("stopme"), trainer_of(config, fresh_model), lambda *_: None)
    wait_for(lambda: job.step >= 2)
    assert registry.stop("stopme") is job and registry.stop("nothing") is None
    assert job.done.wait(120)
    assert job.status == "stopped" and "resume to 'latest'" in job.message
    step, path = job.checkpoints[-1]
    assert step < 200 and path.with_suffix(".resume").is_file()
    resumed = train_lora(make_config(**{**QUICK, "steps": 200, "save_every": 100}, name="stopme", resume="latest"),
                         model=copy.deepcopy(base_model))
    assert resumed.losses[step][0] == step + 1 and resumed.checkpoints[-1].step == 200


def test_a_prompt_turn_pauses_the_job_between_steps_and_changes_nothing(make_config, base_model):
    """A prompt waits for the step in progress, then runs while the job stands still and holds no
    base weight; whatever the prompt does meanwhile (reseed the global RNG; ComfyUI replacing the
    base tensors by equal ones, as un-patching a LoRA does) does not change the LoRA the job trains."""
    from lora_lab.nodes.jobs import release_base_weights, relink_base_weights

    turns = DeviceTurns()
    registry = JobRegistry(turns)
    model = copy.deepcopy(base_model)
    released, relinked = [], []

    def back_to_training() -> None:
        relinked.append(copy.deepcopy(base_model.denoiser))  # the base as ComfyUI hands it back: new tensors
        relink_base_weights(model.denoiser, relinked[-1])

    trainer = trainer_of(make_config(**QUICK, name="paused"), model, back_to_training=back_to_training,
                         leave_device=lambda: released.append(release_base_weights(model.denoiser)))
    job = registry.start(job_of("paused"), trainer, lambda *_: None)
    wait_for(lambda: job.step >= 2)
    with turns.prompt_turn():
        held = job.step
        assert job.status == "paused" and released and released[0] > 0
        frozen = [p for p in model.denoiser.parameters() if not p.requires_grad]
        assert frozen and all(p.device.type == "meta" for p in frozen)  # the prompt has the device alone
        torch.manual_seed(1234)
        torch.rand(1000)  # a prompt's sampling draws from the global generator
        time.sleep(0.5)
        assert job.step == held  # nothing trains during a prompt's turn
    assert job.done.wait(300) and job.status == "finished", job.message
    assert relinked and job.paused_seconds >= 0.5
    fresh = dict(relinked[-1].named_parameters())
    assert any(p is fresh[name.replace(".base_layer.", ".")] for name, p in model.denoiser.named_parameters())
    alone = train_lora(make_config(**QUICK, name="alone"), model=copy.deepcopy(base_model))
    paused, unpaused = load_file(job.checkpoints[-1][1]), load_file(alone.final_path)
    assert paused.keys() == unpaused.keys()
    assert all(torch.equal(paused[key], unpaused[key]) for key in paused)


def test_relinking_refuses_a_base_that_changed_shape(base_model):
    from lora_lab.nodes.jobs import release_base_weights, relink_base_weights

    denoiser = copy.deepcopy(base_model.denoiser).requires_grad_(False)  # frozen, as under a LoRA
    assert release_base_weights(denoiser) == len(list(base_model.denoiser.parameters()))
    other = copy.deepcopy(base_model.denoiser)
    other.conv_in.weight = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(LoraLabError, match="no longer has conv_in.weight as it was"):
        relink_base_weights(denoiser, other)


def test_prompts_wait_for_the_step_in_progress_only():
    turns = DeviceTurns()
    turns.take_job_turn()  # the job is in the middle of a step
    entered = threading.Event()

    def prompt() -> None:
        with turns.prompt_turn():
            entered.set()

    waiting = threading.Thread(target=prompt)
    waiting.start()
    time.sleep(0.2)
    assert not entered.is_set() and turns.prompt_waiting()
    turns.release_job_turn()  # the step ends
    assert entered.wait(5)
    waiting.join(5)
    assert not turns.prompt_waiting()


def test_the_run_value_chooses_checkpoints(tmp_path):
    from lora_lab.nodes.values import TrainingRun

    saved = ((100, tmp_path / "a-step000100.safetensors"), (200, tmp_path / "a-step000200.safetensors"))
    run = TrainingRun("a", saved, ("zkw",), best_step=100, training=True)
    assert run.choose("all") == list(saved) and run.choose("latest") == [saved[1]] and run.choose("best") == [saved[0]]
    assert run.choose(" 200, 100 ") == [saved[1], saved[0]]
    with pytest.raises(LoraLabError, match="no checkpoint at step 300; it has steps 100, 200 so far"):
        run.choose("300")
    with pytest.raises(LoraLabError, match="use all, latest, best"):
        run.choose("newest")
    with pytest.raises(LoraLabError, match="no checkpoint yet: it is training in the background"):
        TrainingRun("b", (), (), training=True).choose("latest")


def test_background_node_returns_at_once_and_its_fingerprint_follows_checkpoints(nodes, stubs, monkeypatch,
                                                                                 fresh_model, concept_dataset):
    from lora_lab.nodes import comfy_bridge, graph_model, jobs, train_lora
    from lora_lab.nodes.values import DatasetValue
    from lora_lab.trainer.data import scan_folder
    from lora_lab.trainer.families import get_family
    from lora_lab.trainer.families.base import ModelIdentity

    sent, freed = [], []
    monkeypatch.setattr(jobs.TURNS, "installed", True)
    monkeypatch.setattr(graph_model, "family_of", lambda model: get_family("sd15"))
    monkeypatch.setattr(graph_model, "model_identity", lambda model, name: ModelIdentity(name, "weights"))
    monkeypatch.setattr(graph_model, "loaded_model", lambda model, clip, vae, identity, *_: fresh_model)
    monkeypatch.setattr(comfy_bridge, "send", lambda event, data: sent.append((event, data)))
    monkeypatch.setattr(comfy_bridge, "free_memory_for_training", lambda model, clip=None: freed.append(model))
    monkeypatch.setattr(comfy_bridge, "release_training_memory", lambda: None)
    monkeypatch.setattr(comfy_bridge, "blocked", lambda message: ("blocked", message))
    monkeypatch.setattr(train_lora.TrainLora, "hidden",
                        types.SimpleNamespace(unique_id="4", prompt={}, extra_pnginfo=None))
    schema = train_lora.TrainLora.define_schema()
    widgets = {i.id: i.options["default"] for i in schema.inputs if "default" in i.options}
    widgets.update(name="bgnode", preset="none", steps=6, save_every=3, rank=4, sample_every=-1, background=True)
    dataset = DatasetValue(scan_folder(concept_dataset), "folder", "fp", lora_type="object")
    assert train_lora.TrainLora.fingerprint_inputs(**{**widgets, "background": False}) == ""
    first_print = train_lora.TrainLora.fingerprint_inputs(**widgets)
    with jobs.TURNS.prompt_turn():  # the prompt that queues the job runs to its end before the job starts
        model_out, clip_out, run, curve, name = train_lora.TrainLora.execute("MODEL", "CLIP", "VAE", dataset,
                                                                             **widgets).values
        time.sleep(0.2)
        assert jobs.JOBS.named("bgnode").step == 0
    # No checkpoint yet: the nodes that would use one wait quietly for a later queue.
    assert model_out == clip_out == run == name == ("blocked", None) and curve.shape[-1] == 3
    job = jobs.JOBS.named("bgnode")
    with_job = train_lora.TrainLora.fingerprint_inputs(**widgets)
    assert with_job != first_print
    assert job.done.wait(300) and job.status == "finished", job.message
    finished_print = train_lora.TrainLora.fingerprint_inputs(**widgets)
    assert finished_print != with_job and train_lora.TrainLora.fingerprint_inputs(**widgets) == finished_print
    again = train_lora.TrainLora.execute("MODEL", "CLIP", "VAE", dataset, **widgets).values
    assert len(jobs.JOBS.jobs) == 1  # the same training: no second run
    run = again[2]
    assert [step for step, _ in run.checkpoints] == [3, 6] and not run.training
    assert again[0]["lora"] == str(run.best) and again[4] == f"lora_lab/bgnode/{run.best.name}"
    events = {event for event, _ in sent}
    assert {"lora_lab.progress", "lora_lab.checkpoint", "lora_lab.status"} <= events


def test_a_run_interrupted_by_a_server_stop_reads_as_stopped_and_resumes(nodes, make_config, base_model, tmp_path):
    """A server killed mid-run leaves a journal that says "training": under a new server it is
    listed as stopped, naming its last checkpoint, and resume = latest continues it."""
    import json

    from lora_lab.nodes.jobs import SERVER_SESSION
    from lora_lab.nodes.routes import jobs_route, run_route
    from lora_lab.trainer.history import journal_path
    from lora_lab.trainer.loop import TrainingCommands, TrainingEvents

    class KilledAfterFourSteps(TrainingEvents, TrainingCommands):
        def should_stop(self) -> bool:
            return self.step >= 4

        def on_step(self, report) -> None:
            self.step = report.step

    folder = tmp_path / "out"
    train_lora(make_config(**QUICK, name="killed"), KilledAfterFourSteps(), model=copy.deepcopy(base_model),
               owner={"node": "4", "server": "an earlier server"})
    journal = journal_path(folder / "killed", "killed")
    state = json.loads(journal.read_text())
    journal.write_text(json.dumps({**state, "status": "training", "message": ""}))  # as a kill leaves it
    status, answer = run_route({"name": "killed"}, folder)
    assert status == 200 and answer["run"]["status"] == "stopped"
    assert "killed-step000004.safetensors (step 4)" in answer["run"]["message"]
    assert "resume to 'latest'" in answer["run"]["message"]
    listed = jobs_route({}, folder)[1]
    assert [(run["name"], run["status"], run["interrupted"]) for run in listed["interrupted"]] == [
        ("killed", "stopped", True)]
    journal.write_text(json.dumps({**state, "status": "training", "owner": {"node": "4", "server": SERVER_SESSION}}))
    assert run_route({"name": "killed"}, folder)[1]["run"]["status"] == "training"  # this server's: still going
    assert jobs_route({}, folder)[1]["interrupted"] == []
    resumed = train_lora(make_config(**QUICK, name="killed", resume="latest"), model=copy.deepcopy(base_model))
    assert resumed.losses[4][0] == 5 and resumed.checkpoints[-1].step == 8


def test_the_stack_takes_the_chosen_checkpoint_of_a_run(nodes, stubs):
    from lora_lab.nodes.apply_lora_stack import build_stack
    from lora_lab.nodes.values import TrainingRun

    folder = stubs.loras / "lora_lab" / "a"
    run = TrainingRun("a", ((10, folder / "a-step000010.safetensors"), (20, folder / "a-step000020.safetensors")),
                      (), best_step=10, training=True)
    assert build_stack(None, run, [], False) == [("lora_lab/a/a-step000010.safetensors", 1.0, 1.0)]  # best
    assert build_stack(None, run, [], False, "latest")[0][0] == "lora_lab/a/a-step000020.safetensors"
    assert build_stack(None, run, [], False, "20")[0][0] == "lora_lab/a/a-step000020.safetensors"
    for several in ("all", "10, 20"):
        with pytest.raises(LoraLabError, match="a stack takes one checkpoint"):
            build_stack(None, run, [], False, several)
