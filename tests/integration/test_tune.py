"""Ray Tune on ray-ckpt: trials checkpoint through WorkerClient and report pointer checkpoints.

Design: every trial is its own ray-ckpt *run* (``<prefix>-<trial_id>``) and starts its own
checkpointer from inside the trial; ``start_checkpointer`` finds it again if it is up. A trial's
id survives retries and PBT restarts, so a restarted trial reconnects to the same run; run names
never come from the trial config, because PBT copies the donor's config into the exploited trial.

The checkpointers are *detached* and scheduled outside the trial's placement group, and the
driver shuts them down after ``fit()``. Tune stops, restarts and (with ``reuse_actors``) recycles
trial processes and removes a stopped trial's placement group: a checkpointer owned by the trial
process, or captured into its placement group (Tune captures child actors by default), dies with
it, and a restarted trial could find it by name just before it dies ("the checkpointer died
during the save", "The actor is restarting").

Tune only ever sees tiny pointer checkpoints, so a PBT exploit hands the exploited trial a pointer
into the *donor's* run, and it loads the donor's weights from ray-ckpt storage.

Training is deterministic (fixed data, full-batch SGD with momentum, one thread), which lets the
tests compare bit for bit: a trial that fails once and resumes must end with exactly the weights
of an identical trial that never failed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ray_ckpt import CheckpointConfig, CheckpointStore

pytestmark = pytest.mark.usefixtures("ray_session")

STEPS = 4


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression problem (the same in every process)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.25
    return x, y


def _digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """A per-tensor sha256 of the bytes (to compare weights across processes)."""
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(state.items())}


def _log_event(directory: str, trial_id: str, event: dict[str, Any]) -> None:
    """Append one JSON line to the trial's event log (the test reads them afterwards; the time
    says where a slow run spent it)."""
    import time

    with open(os.path.join(directory, f"{trial_id}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"trial": trial_id, "t": round(time.time(), 3), **event}) + "\n")


def _events(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted(directory.glob("*.jsonl")) for line in p.read_text().splitlines()]


def _shutdown_checkpointers(prefix: str) -> list[str]:
    """Kill the detached checkpointers of an experiment's trials (their names start with the run prefix)."""
    import ray

    from ray_ckpt.distributed.handle import actor_name

    names = [n for n in ray.util.list_named_actors() if n.startswith(actor_name(prefix))]
    for name in names:
        ray.kill(ray.get_actor(name), no_restart=True)
    return names


def _barrier(directory: str, role: str, step: int, timeout_s: float = 600.0) -> None:
    """Order two asynchronous PBT trials: the learner ("good") reports step 4 only after the other
    ("bad") has reached its first perturbation (step 2), which reports step 4 only once the learner
    has reported step 6. So the learner is in the upper quantile with a checkpoint when the other
    one perturbs again, and the learner has saved past that checkpoint by then.

    ASHA's trials ("leader", "follower"): the follower reports its first rung (step 2) only after
    the leader has failed at step 3, so after Tune took the leader's step-2 result (a function
    trainable's report returns when the next result is asked for); ASHA then has the leader's
    value at that rung and stops the follower there, whichever trial ran faster. The other trial
    may need a fresh Ray worker process first (minutes on a loaded machine), hence the long bound."""
    import time

    Path(directory, f"{role}-{step}").touch()
    # ... and the learner's last report waits for the exploit: PBT only clones a trial that is
    # still running (a finished one leaves the quantiles), so it must not finish first
    wait_for = {
        ("good", 4): "bad-2",
        ("bad", 4): "good-7",
        ("good", 8): "exploited",
        ("follower", 2): "failed",
    }.get((role, step))
    deadline = time.monotonic() + timeout_s
    while wait_for and not Path(directory, wait_for).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _trainable(config: dict[str, Any]) -> None:
    """A Tune function trainable checkpointing every step through ray-ckpt."""
    import time

    from ray import tune

    from ray_ckpt import WorkerClient, start_checkpointer
    from ray_ckpt.distributed.train_tune import (
        get_checkpoint,
        load_from_ray_checkpoint,
        read_pointer,
        report,
        resume_step,
    )

    torch.set_num_threads(1)
    trial_id = tune.get_context().get_trial_id()
    run_name = f"{config['run_prefix']}-{trial_id}"
    ckpt_config = CheckpointConfig(
        storage_uri=config["storage"],
        run_name=run_name,
        metric_name="loss",
        mode="min",
        keep_last_n=config.get("keep_last_n"),
    )
    # DEFAULT scheduling: not inside the trial's placement group (Tune captures child actors into
    # it, and removes it, killing whatever runs there, when the trial stops or fails). The start
    # bound is generous: a new actor process imports torch, minutes on a loaded 2-core machine.
    started = time.monotonic()
    handle = start_checkpointer(ckpt_config, detached=True, scheduling_strategy="DEFAULT", start_timeout_s=600)
    _log_event(config["events"], trial_id, {"event": "up", "seconds": round(time.monotonic() - started, 1)})
    client = WorkerClient(run_name, rank=0, world_size=1, handle=handle)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    x, y = _data()

    restored_step = None
    checkpoint = get_checkpoint(ckpt_config)  # Tune's checkpoint (a PBT donor's, a retry's) if it has one
    role = None if checkpoint is not None else config.get("roles", {}).get(str(config["lr"]))
    if checkpoint is not None:
        pointer = read_pointer(checkpoint)
        restored_step, state, trainer_state = load_from_ray_checkpoint(checkpoint)
        model.load_state_dict(state)
        optimizer.load_state_dict(trainer_state["optimizer"])
        for group in optimizer.param_groups:  # a PBT exploit brings the donor's lr along
            group["lr"] = config["lr"]
        if pointer["run_name"] != run_name:
            Path(config["events"], "exploited").touch()  # see _barrier
        _log_event(
            config["events"],
            trial_id,
            {
                "event": "restore",
                "own_run": run_name,
                "pointer_run": pointer["run_name"],
                "pointer_step": restored_step,
                "digest": _digest(model.state_dict()),
                "lr": config["lr"],
            },
        )
    first = resume_step(ckpt_config, restored_step)
    if first == 0:
        first = 1
    for step in range(first, config["steps"] + 1):
        fails = config.get("fail_lr") in (None, config["lr"])  # only the trial of that lr fails, if given
        if fails and step == config.get("fail_at") and checkpoint is None:
            _log_event(config["events"], trial_id, {"event": "fail", "own_run": run_name, "step": step})
            Path(config["events"], "failed").touch()  # see _barrier
            raise RuntimeError(f"planned failure at step {step}")
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        metrics = {"loss": float(loss.detach())}
        trainer_state = {"optimizer": optimizer.state_dict()}
        # no wait of our own: the checkpointer's save_timeout_s bounds a step (it aborts it)
        saving = time.monotonic()
        info = client.save(step, model.state_dict(), metrics=metrics, trainer_state=trainer_state).result()
        seconds = round(time.monotonic() - saving, 1)
        _log_event(config["events"], trial_id, {"event": "save", "own_run": run_name, "step": step, "seconds": seconds})
        if role is not None:  # asynchronous PBT, ASHA: order the two fresh trials (see _barrier)
            _barrier(config["events"], role, step)
        report({**metrics, "step": step, "lr": config["lr"]}, info, ckpt_config)


def _fit(tmp_path: Path, param_space: dict[str, Any], **kwargs: Any) -> Any:
    """Run a Tuner over ``_trainable``; the trials' checkpointers are shut down afterwards."""
    from ray import tune

    resources = kwargs.pop("resources", None)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, resources) if resources else _trainable,
        param_space=param_space,
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "ray_results"),
            name="exp",
            verbose=0,
            failure_config=kwargs.pop("failure_config", None),
            checkpoint_config=kwargs.pop("checkpoint_config", None),
            callbacks=kwargs.pop("callbacks", None),
        ),
        **kwargs,
    )
    try:
        results = tuner.fit()
    finally:
        stopped = _shutdown_checkpointers(param_space["run_prefix"])
    assert len(stopped) == len(results)  # one checkpointer per trial, found again on every restart
    return results


def test_tune_trials_checkpoint_through_ray_ckpt_and_resume_after_failure(tmp_path: Path, run_name: str) -> None:
    """Two trials save through ray-ckpt; the one that fails once resumes from its pointer and ends bit-identical."""
    from ray import tune

    from ray_ckpt.distributed.train_tune import load_from_ray_checkpoint, read_pointer

    events = tmp_path / "events"
    events.mkdir()
    storage = str(tmp_path / "ckpt")
    results = _fit(
        tmp_path,
        {
            "run_prefix": run_name,
            "storage": storage,
            "events": str(events),
            "steps": STEPS,
            "lr": 0.05,
            "fail_at": tune.grid_search([None, 3]),
        },
        tune_config=tune.TuneConfig(metric="loss", mode="min", reuse_actors=True),
        failure_config=tune.FailureConfig(max_failures=1),
    )
    assert len(results) == 2
    assert not results.errors, results.errors

    finals: dict[Any, dict[str, torch.Tensor]] = {}
    for result in results:
        trial_run = f"{run_name}-{result.metrics['trial_id']}"
        assert result.metrics["step"] == STEPS
        # Tune's checkpoint is a pointer into the trial's own ray-ckpt run, at its last step
        pointer = read_pointer(result.checkpoint)
        assert (pointer["run_name"], pointer["step"]) == (trial_run, STEPS)
        assert os.listdir(result.checkpoint.path) == ["ray_ckpt_pointer.json"]  # no second copy of weights
        store = CheckpointStore(storage, run_name=trial_run)
        assert [i.step for i in store.list()] == list(range(1, STEPS + 1))
        step, state, trainer_state = load_from_ray_checkpoint(result.checkpoint)
        assert step == STEPS and set(state) == {"weight", "bias"}
        assert "momentum_buffer" in trainer_state["optimizer"]["state"][0]
        finals[result.config["fail_at"]] = state

    log = _events(events)
    fails = [e for e in log if e["event"] == "fail"]
    assert len(fails) == 1 and fails[0]["step"] == 3
    failed_run = fails[0]["own_run"]
    restores = [e for e in log if e["event"] == "restore" and e["own_run"] == failed_run]
    assert len(restores) == 1
    restore = restores[0]
    # resumed from the last saved step of its own run, with exactly the weights saved there
    assert restore["pointer_run"] == failed_run and restore["pointer_step"] == 2
    assert restore["digest"] == _digest(CheckpointStore(storage, run_name=failed_run).load(2))
    saves = [e["step"] for e in log if e["event"] == "save" and e["own_run"] == failed_run]
    assert saves == [1, 2, 3, 4]  # continued at step 3, nothing redone
    # weights and momentum came back exactly: the resumed trial ends where the unbroken one does
    assert _digest(finals[3]) == _digest(finals[None])


@pytest.mark.parametrize("synch", [True, False], ids=["sync", "async"])
def test_pbt_exploit_restores_the_donor_trial_weights_from_ray_ckpt(tmp_path: Path, run_name: str, synch: bool) -> None:
    """PBT clones the good trial into the bad one, which loads the donor's step from ray-ckpt.

    ray-ckpt keeps one step per run (keep_last_n=1); Ray keeps the newest two checkpoints per
    trial (``CheckpointConfig(num_to_keep=2)``, what docs/RAY.md suggests to bound storage, with
    its ``PointerKeeper`` callback), over 6 (sync) and 8 (async) steps, perturbing every 2. Ray
    deletes the donor's pointer folder of an exploit before the exploited trial restores from it;
    ray-ckpt puts it back and the step must still be there. Synchronous PBT: one trial runs at a
    time (3 of Ray's 4 CPUs each), so the donor always reports two more steps (Ray deletes the
    exploited folder) before the other trial restores, at steps 2 and 4; the restore that hung
    before. Asynchronous PBT: ``_barrier`` makes the donor save past the exploited step first.
    Every checkpoint Ray lists loads (a final checkpoint may be a folder ray-ckpt put back: an
    exploit after the trial's last report), and once Ray's leases are settled each run holds
    exactly the steps Ray lists for it.
    """
    import ray.train
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from ray_ckpt.distributed.train_tune import (
        RESTORED_MARKER,
        PointerKeeper,
        load_from_ray_checkpoint,
        read_pointer,
        release_unreferenced,
    )

    events = tmp_path / "events"
    events.mkdir()
    storage = str(tmp_path / "ckpt")
    steps = 6 if synch else 8
    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=2,
        quantile_fraction=0.5,
        resample_probability=0.0,
        # sync: an exploited trial always goes on with lr 0.0, so it stays the worse one (no tie
        # with its donor, whose weights it copied) and is the one exploited at every perturbation
        hyperparam_mutations={"lr": [0.0] if synch else [0.0, 0.05]},
        synch=synch,
    )
    results = _fit(
        tmp_path,
        {
            "run_prefix": run_name,
            "storage": storage,
            "events": str(events),
            "steps": steps,
            "keep_last_n": 1,
            "roles": {} if synch else {"0.05": "good", "0.0": "bad"},
            "lr": tune.grid_search([0.05, 0.0]),  # 0.0 never learns: clearly the worse trial
        },
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=pbt, reuse_actors=True),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[PointerKeeper()],
        resources={"cpu": 3} if synch else None,  # sync: one trial at a time, in a fixed order
    )
    assert len(results) == 2
    assert not results.errors, results.errors
    put_back = {  # (run, step) of the pointer folders Ray deleted and ray-ckpt put back
        (read_pointer(ckpt)["run_name"], read_pointer(ckpt)["step"])
        for result in results
        for ckpt in (
            ray.train.Checkpoint.from_directory(str(p.parent)) for p in Path(result.path).glob(f"*/{RESTORED_MARKER}")
        )
    }

    log = _events(events)
    saves = [e for e in log if e["event"] == "save"]
    runs_by_trial = {e["trial"]: e["own_run"] for e in saves}
    assert len(runs_by_trial) == 2
    exploits = [e for e in log if e["event"] == "restore" and e["pointer_run"] != e["own_run"]]
    assert exploits, f"no PBT exploit happened: {log}"
    exploit = min(exploits, key=lambda e: e["pointer_step"])  # the first: the good trial into the bad one
    donor_run = exploit["pointer_run"]
    assert donor_run in runs_by_trial.values() and donor_run != exploit["own_run"]
    donor_saves = [e["step"] for e in saves if e["own_run"] == donor_run]
    if synch:  # exploited at steps 2 and 4 (and 6); Ray deleted the folders of 2 and 4 before the restore
        assert [e["pointer_step"] for e in exploits if e["own_run"] == exploit["own_run"]][:2] == [2, 4]
        assert (donor_run, 4) in put_back, put_back
    else:  # the donor had moved on: with keep_last_n=1 alone its step would have been deleted
        assert max(donor_saves) > exploit["pointer_step"] >= 4
    donor = CheckpointStore(storage, run_name=donor_run)
    # the exploited trial holds exactly the donor's saved weights of that step
    assert exploit["digest"] == _digest(donor.load(exploit["pointer_step"]))
    # ... and carries on in its own run, numbering past what that run already holds
    own = CheckpointStore(storage, run_name=exploit["own_run"])
    steps_after = [e["step"] for e in saves if e["own_run"] == exploit["own_run"]]
    assert steps_after == sorted(set(steps_after)) and steps_after[-1] == steps

    # every checkpoint Ray lists loads; after settling, each run holds exactly what Ray lists of it
    listed: dict[str, set[int]] = {run: set() for run in runs_by_trial.values()}
    for result in results:
        for checkpoint in [c for c, _ in result.best_checkpoints] + [result.checkpoint]:
            step, state, _ = load_from_ray_checkpoint(checkpoint)
            listed[read_pointer(checkpoint)["run_name"]].add(step)
    for run in listed:
        config = CheckpointConfig(storage_uri=storage, run_name=run, keep_last_n=1)
        release_unreferenced(config)
        store = CheckpointStore(config=config)
        store.apply_retention()  # the trials' checkpointers are gone: apply what the rules keep now
        kept = {i.step for i in store.reload().list()}
        assert kept == listed[run] | {store.latest().step}, (run, kept, listed[run], put_back)
    if synch:  # Ray keeps two per trial: ray-ckpt's retention still deleted the rest
        assert all(len(steps_kept) <= 3 for steps_kept in listed.values())
    assert own.latest() is not None and own.latest().step == steps


def test_pointer_checkpoints_round_trip_and_leave_secrets_out(tmp_path: Path) -> None:
    """Pointers name the committed step, never carry credentials, and refuse what is not a pointer."""
    import ray.train

    from ray_ckpt.distributed.train_tune import (
        POINTER_FILE,
        load_from_ray_checkpoint,
        read_pointer,
        report,
        resume_step,
        to_ray_checkpoint,
    )

    store = CheckpointStore(str(tmp_path / "ckpt"), run_name="r")
    assert resume_step(store.config, None) == 0
    info = store.save(3, {"w": torch.arange(4.0)}, trainer_state={"optimizer": {"lr": torch.tensor(0.5)}})
    checkpoint = to_ray_checkpoint(info, store.config, directory=str(tmp_path / "p1"))
    assert isinstance(checkpoint, ray.train.Checkpoint)
    step, state, trainer_state = load_from_ray_checkpoint(checkpoint)
    assert step == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert float(trainer_state["optimizer"]["lr"]) == 0.5
    assert resume_step(store.config, 1) == 4  # another run's older step: numbering goes on past our latest

    secret_config = store.config.replace(
        storage_options={
            "key": "AKIAEXAMPLE",
            "secret": "hunter2",
            "token": "tok-9f8e7d",
            "anon": False,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_secret_access_key": "hunter2"},
        }
    )
    pointer_dir = tmp_path / "p2"
    pointer = read_pointer(to_ray_checkpoint(info, secret_config, directory=str(pointer_dir)))
    raw = (pointer_dir / POINTER_FILE).read_text()
    assert "hunter2" not in raw and "AKIAEXAMPLE" not in raw and "tok-9f8e7d" not in raw
    assert pointer["storage_options"] == {"anon": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert (pointer["run_name"], pointer["step"], pointer["uri"]) == ("r", 3, info.uri)
    assert pointer["storage_uri"].startswith("file://")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a ray-ckpt pointer"):
        read_pointer(ray.train.Checkpoint.from_directory(str(tmp_path / "empty")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / POINTER_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a ray-ckpt pointer"):
        read_pointer(ray.train.Checkpoint.from_directory(str(tmp_path / "other")))
    with pytest.raises(RuntimeError, match="not inside a Ray Tune trial or a Ray Train worker"):
        report({"loss": 1.0}, info, store.config)

    # Ray's CheckpointConfig from ray-ckpt's retention, and back
    from ray_ckpt.distributed.train_tune import ray_checkpoint_config, retention_from_ray

    ranked = ray_checkpoint_config(CheckpointConfig(metric_name="loss", keep_top_k=3, keep_last_n=1))
    assert (ranked.num_to_keep, ranked.checkpoint_score_attribute, ranked.checkpoint_score_order) == (3, "loss", "min")
    assert retention_from_ray(ranked) == {"keep_top_k": 3, "metric_name": "loss", "mode": "min"}
    assert ray_checkpoint_config(CheckpointConfig(keep_last_n=2)).num_to_keep == 2
    assert ray_checkpoint_config(CheckpointConfig()).num_to_keep is None


def test_asha_with_a_failing_trial_resumes_it_and_stops_the_other(tmp_path: Path, run_name: str) -> None:
    """ASHA stops the worse trial at its first rung; the better one fails once after it and resumes
    from its own pointer (Ray keeps two per trial), ending bit-identical to an unbroken run."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ray_ckpt.distributed.train_tune import load_from_ray_checkpoint, read_pointer

    events = tmp_path / "events"
    events.mkdir()
    storage = str(tmp_path / "ckpt")
    asha = ASHAScheduler(time_attr="training_iteration", max_t=STEPS, grace_period=2, reduction_factor=2)
    results = _fit(
        tmp_path,
        {
            "run_prefix": run_name,
            "storage": storage,
            "events": str(events),
            "steps": STEPS,
            "lr": tune.grid_search([0.05, 0.0]),
            "fail_at": 3,
            "fail_lr": 0.05,
            "roles": {"0.05": "leader", "0.0": "follower"},  # ASHA sees the leader's rung first
        },
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=asha, reuse_actors=True),
        failure_config=tune.FailureConfig(max_failures=1),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )
    assert len(results) == 2 and not results.errors, results.errors
    by_lr = {r.config["lr"]: r for r in results}
    assert by_lr[0.0].metrics["step"] == 2  # stopped by ASHA at its first rung
    assert by_lr[0.05].metrics["step"] == STEPS
    log = _events(events)
    fails = [e for e in log if e["event"] == "fail"]
    assert len(fails) == 1 and fails[0]["step"] == 3
    restores = [e for e in log if e["event"] == "restore" and e["own_run"] == fails[0]["own_run"]]
    assert [(r["pointer_run"], r["pointer_step"]) for r in restores] == [(fails[0]["own_run"], 2)]
    for result in results:
        step, state, _ = load_from_ray_checkpoint(result.checkpoint)
        assert read_pointer(result.checkpoint)["step"] == step == result.metrics["step"]


def test_pointer_keeper_puts_back_what_ray_deletes_and_fails_a_trial_that_cannot_restore(tmp_path: Path) -> None:
    """The driver callback, step by step as Tune calls it: copy each pointer before Ray registers
    it, put the newest two folders Ray deleted back right after, forget older ones (folder, mark
    and copy), hand a put-back folder a final checkpoint names over to Ray at the end, and turn a
    trial whose checkpoint folder is gone into an immediate error."""
    from types import SimpleNamespace

    import ray.train

    from ray_ckpt.distributed.train_tune import (
        RESTORED_MARKER,
        SIDECAR_DIR,
        PointerKeeper,
        load_from_ray_checkpoint,
        write_pointer,
    )

    store = CheckpointStore(str(tmp_path / "ckpt"), run_name="r")
    trial_dir = tmp_path / "trial"
    keeper = PointerKeeper()
    checkpoints = []
    for index in range(5):
        info = store.save(index + 1, {"w": torch.full((2,), float(index))})
        folder = trial_dir / f"checkpoint_{index:06d}"
        write_pointer(str(folder), info, store.config)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        checkpoints.append(checkpoint)
        trial = SimpleNamespace(trial_id="t1", checkpoint=checkpoint)
        keeper.on_checkpoint(iteration=index, trials=[trial], trial=trial, checkpoint=checkpoint)
        if index >= 2:  # Ray's num_to_keep=2 deletes the folder two back, as it registers this one
            for path in (trial_dir / f"checkpoint_{index - 2:06d}").iterdir():
                path.unlink()
            (trial_dir / f"checkpoint_{index - 2:06d}").rmdir()
        keeper.on_trial_save(iteration=index, trials=[trial], trial=trial)
    # Ray holds 3 and 4; 1 and 2 (deleted) are back, marked; 0 (out of the window) is gone with its copy
    names = sorted(p.name for p in trial_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert names == [f"checkpoint_{i:06d}" for i in (1, 2, 3, 4)]
    assert [(trial_dir / n / RESTORED_MARKER).exists() for n in names] == [True, True, False, False]
    sidecar = sorted(p.name for p in (trial_dir / SIDECAR_DIR).iterdir())
    assert "checkpoint_000000.json" not in sidecar and "checkpoint_000002.restored" in sidecar
    assert load_from_ray_checkpoint(checkpoints[1])[0] == 2  # a PBT exploit of a deleted folder resolves
    # at the end, a put-back folder that a trial's final checkpoint names becomes Ray's (unmarked)
    final = SimpleNamespace(trial_id="t9", checkpoint=checkpoints[2])
    keeper.on_experiment_end(trials=[final, SimpleNamespace(trial_id="t8", checkpoint=None)])
    assert not (trial_dir / names[1] / RESTORED_MARKER).exists() and (trial_dir / names[0] / RESTORED_MARKER).exists()
    assert not (trial_dir / SIDECAR_DIR / "checkpoint_000002.restored").exists()

    # a trial whose checkpoint folder is gone cannot be restored: an error now, not a wait
    gone = ray.train.Checkpoint.from_directory(str(trial_dir / "checkpoint_000000"))
    trial = SimpleNamespace(trial_id="t2", checkpoint=gone)
    with pytest.raises(RuntimeError, match="cannot be restored: its checkpoint folder .*checkpoint_000000 is gone"):
        keeper.on_trial_error(iteration=9, trials=[trial], trial=trial)
    keeper.on_trial_error(iteration=9, trials=[trial], trial=SimpleNamespace(trial_id="t3", checkpoint=checkpoints[4]))


def test_pointer_keeper_stops_only_an_experiment_that_can_no_longer_move(tmp_path: Path) -> None:
    """on_step_end, as Tune calls it after each driver step: paused trials alone are no reason to
    stop (a scheduler may resume them), nor a failed trial while another runs or is about to
    (Tune sets a trial its scheduler picks to PENDING in the same step, as asynchronous PBT does);
    a trial Tune will not retry plus paused trials and none running, for STALLED_STEPS steps in a
    row, is synchronous PBT's endless wait: a RuntimeError naming the trials and the error."""
    from types import SimpleNamespace

    from ray_ckpt.distributed.train_tune import STALLED_STEPS, PointerKeeper

    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "Failure # 1 (occurred at 2026-12-07_10-00-00)\nTraceback (most recent call last):\n"
        '  File "train.py", line 3, in step\nTimeoutError: step 1: not committed within 60s\n\n'
    )
    keeper = PointerKeeper()
    paused = SimpleNamespace(trial_id="t1", status="PAUSED")
    failed = SimpleNamespace(trial_id="t2", status="ERROR", checkpoint=None, error_file=str(error_file))
    trials = [paused, failed]
    for iteration in range(2 * STALLED_STEPS):  # no failure Tune reported: nothing to say
        keeper.on_step_end(iteration=iteration, trials=trials)
    keeper.on_trial_error(iteration=10, trials=trials, trial=failed)
    keeper.on_step_end(iteration=11, trials=trials)
    for status in ("PENDING", "RUNNING"):  # the scheduler resumed it: the count starts again
        paused.status = status
        keeper.on_step_end(iteration=12, trials=trials)
    paused.status = "PAUSED"
    for iteration in range(STALLED_STEPS - 1):
        keeper.on_step_end(iteration=13 + iteration, trials=trials)
    expected = r"trial t2 failed: TimeoutError: step 1: not committed within 60s\. "
    with pytest.raises(RuntimeError, match=expected) as caught:
        keeper.on_step_end(iteration=20, trials=trials)
    assert "trials t1 are paused with none running" in str(caught.value)
    assert "would wait forever" in str(caught.value)


def test_sync_pbt_beyond_the_kept_window_fails_at_once_instead_of_waiting(tmp_path: Path, run_name: str) -> None:
    """Synchronous PBT whose donor reports 4 checkpoints between perturbations with Ray's
    num_to_keep=1: Ray deletes the exploited folder and 3 more before the exploited trial restores
    (beyond the 2 ray-ckpt keeps; docs/RAY.md asks for num_to_keep >= perturbation_interval - 1).
    Ray's restore fails, and instead of synchronous PBT's endless wait for that trial the
    experiment stops at once with PointerKeeper's error saying why. (time_budget_s turns a
    regression into a failed assertion instead of a hung test.)"""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from ray_ckpt.distributed.train_tune import PointerKeeper

    events = tmp_path / "events"
    events.mkdir()
    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=4,
        quantile_fraction=0.5,
        resample_probability=0.0,
        hyperparam_mutations={"lr": [0.0]},
        synch=True,
    )
    with pytest.raises(Exception) as caught:
        _fit(
            tmp_path,
            {
                "run_prefix": run_name,
                "storage": str(tmp_path / "ckpt"),
                "events": str(events),
                "steps": 8,
                "keep_last_n": 1,
                "lr": tune.grid_search([0.05, 0.0]),
            },
            tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=pbt, reuse_actors=True, time_budget_s=240),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[PointerKeeper()],
            resources={"cpu": 3},  # one trial at a time: the donor runs steps 5-8 before the restore
        )
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("cannot be restored: its checkpoint folder" in text for text in chain), chain
    assert any("Synchronous PBT would wait for this trial forever" in text for text in chain), chain


def test_sync_pbt_stops_at_once_when_a_trial_fails_for_good(tmp_path: Path, run_name: str) -> None:
    """Synchronous PBT whose trial of lr 0.0 fails at step 1 with no retry left: the other trial
    pauses at the first perturbation (step 2) waiting for it, and Tune, which keeps a failed trial
    among the live ones, would never resume it. PointerKeeper stops the experiment instead, with
    an error naming the failed trial and its error. (time_budget_s turns a regression into a
    failed assertion instead of a hung test.)"""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from ray_ckpt.distributed.train_tune import PointerKeeper

    events = tmp_path / "events"
    events.mkdir()
    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=2,
        quantile_fraction=0.5,
        resample_probability=0.0,
        hyperparam_mutations={"lr": [0.0]},
        synch=True,
    )
    with pytest.raises(Exception) as caught:
        _fit(
            tmp_path,
            {
                "run_prefix": run_name,
                "storage": str(tmp_path / "ckpt"),
                "events": str(events),
                "steps": 4,
                "lr": tune.grid_search([0.05, 0.0]),
                "fail_at": 1,
                "fail_lr": 0.0,
            },
            tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=pbt, reuse_actors=True, time_budget_s=480),
            callbacks=[PointerKeeper()],
        )
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    log = _events(events)
    [failed] = [e for e in log if e["event"] == "fail"]
    failed_trial = failed["trial"]
    stopped = [text for text in chain if "would wait forever" in text]
    assert stopped, chain
    assert f"trial {failed_trial} failed: RuntimeError: planned failure at step 1" in stopped[0], stopped[0]
    # the other trial got to the perturbation, paused there, and was never resumed
    waiting = {e["trial"] for e in log} - {failed_trial}
    assert len(waiting) == 1 and f"trials {waiting.pop()} are paused" in stopped[0], stopped[0]
    assert [e["step"] for e in log if e["event"] == "save" and e["trial"] != failed_trial] == [1, 2]
