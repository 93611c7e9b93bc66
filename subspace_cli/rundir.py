"""A ``project-train`` run directory: its layout, starting, resuming and summarising a run.

Layout (all written by this module)::

    RUN_DIR/config.json                  the TrainConfig, the command, the start checkpoint's spec
    RUN_DIR/run.h5                       the log (``runlog``), appended every --log-every steps
    RUN_DIR/run.h5.bak                   run.h5 as of the last checkpoint
    RUN_DIR/step_NNNNNNN.safetensors     weights at step N (a checkpoint any command reads)
    RUN_DIR/step_NNNNNNN.state.safetensors   optimizer, data order and tracker state at step N
    RUN_DIR/last.safetensors             the newest weights

A step counts as saved once both of its files exist and read; resuming starts from the newest
such step, truncates ``run.h5`` to it, and continues bit-identically.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from subspace_cli import parallel

STATE_SUFFIX = ".state.safetensors"
LOCK_NAME = ".lock"


def run_path(run_dir: Path, step: int, state: bool = False) -> Path:
    """The weights (or, with ``state``, the training state) file of ``step``."""
    return run_dir / (f"step_{step:07d}{STATE_SUFFIX}" if state else f"step_{step:07d}.safetensors")


def start(checkpoint: Path, run_dir: Path, overrides: Any, *, steps: int, k: int | None,
          batch_size: int | None, options: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Start a run from ``checkpoint`` in the new (empty or absent) ``run_dir``; ``options``
    are :class:`~subspace_cli.projected.TrainConfig` fields. Returns :func:`summary`."""
    import dataclasses

    from subspace_cli.errors import UsageError
    from subspace_cli.experiment import load_experiment
    from subspace_cli.functional import check_measurement_mode, mode_dependence
    from subspace_cli.projected import TrainConfig, mode_record
    from subspace_cli.writable import check_writable

    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:  # an option of the command that no field takes: our bug, never dropped
        raise TypeError(f"options without a TrainConfig field: {', '.join(sorted(unknown))}")
    if run_dir.exists():
        _refuse_if_used(run_dir)
    check_writable(run_dir, directory=True)
    experiment = load_experiment(checkpoint, overrides)
    assert experiment.data is not None
    config = TrainConfig(
        checkpoint=str(checkpoint), steps=steps, batch_size=batch_size,
        k=experiment.data.num_classes if k is None else k, **options,
    )
    config.check()
    if batch_size is not None and batch_size > len(experiment.data):
        raise UsageError(f"batch size {batch_size} exceeds the {len(experiment.data)} samples")
    check_measurement_mode(experiment.model, config.train_mode, config.allow_dropout)
    n_params = sum(p.numel() for p in experiment.model.parameters())
    if config.k > n_params:  # checked again by the trainer; here before anything is written
        raise UsageError(f"k = {config.k} exceeds the model's {n_params} parameters")
    created = not run_dir.exists()
    # data-parallel: every rank has checked the directory before rank 0 writes to it
    parallel.barrier("checking the run directory")
    if parallel.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir), deferred_interrupts() as stop:
        spec = experiment.spec
        stored = {"config": dataclasses.asdict(config), "command": _command(),
                  "spec": dataclasses.asdict(spec), "start_step": spec.step or 0,
                  "start_sha256": experiment.checkpoint.sha256(),
                  "world_size": parallel.world().size}
        if not parallel.is_main():  # a rank that computes and writes nothing
            return _drive(run_dir, config, experiment, stored, until=config.steps,
                          resumed=None, quiet=quiet, stop=stop)
        _refuse_if_used(run_dir)  # again under the lock: another start may have got here first
        try:
            _write_config(run_dir, stored)
            from subspace_cli import runlog

            runlog.create(run_dir / "run.h5", dataclasses.asdict(config), stored["command"],
                          modes=mode_record(config, mode_dependence(experiment.model)))
            return _drive(run_dir, config, experiment, stored, until=config.steps,
                          resumed=None, quiet=quiet, stop=stop)
        except BaseException:
            if latest_complete(run_dir) is None:  # nothing to resume: leave no half-made run
                _discard(run_dir, remove_directory=created)
            raise


def resume(run_dir: Path, steps: int | None, *, quiet: bool,
           limits: Any = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest saved step (to ``steps`` in all when
    given). Returns :func:`summary`."""
    import dataclasses

    from subspace_cli import runlog
    from subspace_cli.checkpoint import SpecOverrides, read_checkpoint
    from subspace_cli.errors import InputError, UsageError
    from subspace_cli.experiment import load_experiment
    from subspace_cli.output import say
    from subspace_cli.projected import RunState, TrainConfig
    from subspace_cli.writable import check_writable

    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise InputError(f"{run_dir} has no config.json: not a project-train run directory")
    check_writable(run_dir, directory=True)
    with _locked(run_dir), deferred_interrupts() as stop:
        stored = _read_config(config_path)
        latest = latest_complete(run_dir)
        if latest is None:
            raise InputError(f"{run_dir} has no complete checkpoint to resume from")
        weights, state_file = latest
        state_ckpt = read_checkpoint(state_file)
        state = RunState.from_json(state_ckpt.metadata["subspace.run_state"])
        config = TrainConfig(**stored["config"])
        made_by = int(stored.get("world_size", 1))
        if made_by != parallel.world().size:
            raise UsageError(
                f"{run_dir} was trained by {_processes(made_by)} and this is "
                f"{_processes(parallel.world().size)}: resume it with {made_by} (the order of "
                "the sums over the training set, hence the rounding, depends on it)"
            )
        if steps is not None and steps != config.steps:
            if steps < state.step:
                raise UsageError(f"{run_dir} is at step {state.step}; --steps {steps} would "
                                 f"shorten it (give --steps {state.step} or more)")
            config = dataclasses.replace(config, steps=steps)
            stored["config"]["steps"] = steps  # a later plain --resume goes on to it
            if parallel.is_main():
                _write_config(run_dir, stored)
        if state.step >= config.steps:
            say(f"{run_dir} is complete at step {state.step} of {config.steps}: nothing to do "
                "(--steps N continues it to step N)")
            return summary(run_dir)
        spec = stored["spec"]
        overrides = SpecOverrides(model=spec["model"] if spec["model_from_user"] else None,
                                  data=spec["data"] if spec["data_from_user"] else None,
                                  **({} if limits is None else {"limits": limits}))
        experiment = load_experiment(weights, overrides)
        stop.raise_if_requested()
        parallel.barrier("reading the run directory")  # before rank 0 writes to it
        if parallel.is_main():
            runlog.truncate_for_resume(run_dir / "run.h5", state.step)
        return _drive(run_dir, config, experiment, stored, until=config.steps,
                      resumed=(state_ckpt.tensors, state), quiet=quiet, stop=stop)


def _refuse_if_used(run_dir: Path) -> None:
    """Refuse a directory that holds anything but a lock file."""
    from subspace_cli.errors import UsageError
    from subspace_cli.writable import PROBE_PREFIX

    if any(p.name != LOCK_NAME and not p.name.startswith(PROBE_PREFIX)  # check_writable's
           for p in run_dir.iterdir()):
        raise UsageError(f"{run_dir} is not empty: choose a new --out, or --resume {run_dir}")


def _read_config(path: Path) -> dict[str, Any]:
    """``config.json``, upgraded from older runs; a damaged file is an :class:`InputError`."""
    from subspace_cli.errors import InputError

    try:
        stored = json.loads(path.read_text())
        stored["config"]["steps"], stored["spec"]["model"], stored["start_step"]  # noqa: B018
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is damaged ({type(exc).__name__}: {exc}); the run's "
                         "checkpoints are intact, but it cannot be resumed") from exc
    # A run from before the tracker recomputed warm every --refresh-every steps.
    stored["config"].setdefault("refresh", "warm")
    # Runs from before this field was dropped (it had no option and was always false).
    stored["config"].pop("train_mode_hessian", None)
    return stored


def _write_config(run_dir: Path, stored: dict[str, Any]) -> None:
    from subspace_cli.report import write_text

    write_text(run_dir / "config.json", json.dumps(stored, indent=2, sort_keys=True) + "\n")


def _processes(n: int) -> str:
    return "one process" if n == 1 else f"{n} data-parallel processes"


def _locked(run_dir: Path) -> Any:
    """One process at a time in a run directory: a second one is refused at once (exit 2).
    In a data-parallel run rank 0 holds the lock for all."""
    from subspace_cli import locking

    if not parallel.is_main():
        return contextlib.nullcontext()
    return locking.exclusive(run_dir / LOCK_NAME, what=f"run directory {run_dir}", wait=0,
                             hint="; a project-train is running there: wait for it to finish, "
                                  "or stop it and --resume")


def _discard(run_dir: Path, *, remove_directory: bool) -> None:
    """Remove what :func:`start` wrote (and the directory it made), so that the same command
    can be run again: used when a run ends before its first checkpoint."""
    names = {"config.json", "run.h5", "run.h5.bak", "last.safetensors", LOCK_NAME}
    for entry in run_dir.iterdir():
        if entry.name in names or entry.name.startswith("step_") or (
                entry.name.startswith(".") and entry.name.endswith(".tmp")):
            with contextlib.suppress(OSError):
                entry.unlink()
    if remove_directory:
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def latest_complete(run_dir: Path) -> tuple[Path, Path] | None:
    """The newest step whose weights and state files both exist and read."""
    from subspace_cli.checkpoint import read_checkpoint
    from subspace_cli.errors import CheckpointError

    candidates = sorted(run_dir.glob(f"step_*{STATE_SUFFIX}"), reverse=True)
    for state_file in candidates:
        weights = run_dir / state_file.name.replace(STATE_SUFFIX, ".safetensors")
        try:
            read_checkpoint(state_file)
            read_checkpoint(weights)
        except CheckpointError:
            continue
        return weights, state_file
    return None


def _command() -> str:
    import shlex
    import sys

    return shlex.join(["subspace", *sys.argv[1:]])


def _drive(run_dir: Path, config: Any, experiment: Any, stored: dict[str, Any], *, until: int,
           resumed: Any, quiet: bool, stop: _StopRequest) -> dict[str, Any]:
    import math

    from subspace_cli import runlog
    from subspace_cli.checkpoint import write_checkpoint
    from subspace_cli.errors import NumericalError, StorageError
    from subspace_cli.output import progress_bar, progress_enabled, say
    from subspace_cli.projected import ProjectedTraining, mode_note, parameters_tensor_dict

    run_file = run_dir / "run.h5"
    start_step = int(stored["start_step"])
    last_saved: list[str] = []

    main = parallel.is_main()  # in a data-parallel run only rank 0 writes

    def on_log(row: Any) -> None:
        if main:
            runlog.append(run_file, runlog.LOG, [row])

    def on_refresh(row: Any) -> None:
        if main:
            runlog.append(run_file, runlog.REFRESH, [row])

    def on_audit(row: Any) -> None:
        if main:
            runlog.append(run_file, runlog.AUDIT, [row])

    def on_save(training: ProjectedTraining) -> None:
        parallel.agree(training.theta, "the parameters")
        if not main:
            return
        step = training.state.step
        meta = experiment.spec.to_metadata(step=start_step + step)
        meta["subspace.run_step"] = str(step)
        meta["subspace.run"] = json.dumps({"mode": config.mode, "optimizer": config.optimizer,
                                           "lr": config.lr, "k": config.k,
                                           "run_dir": str(run_dir)}, sort_keys=True)
        state_meta = {"subspace.run_state": training.run_state().to_json(),
                      "subspace.format_version": "1"}
        write_checkpoint(run_path(run_dir, step, state=True), training.state_tensors(),
                         state_meta, overwrite=True)
        tensors = parameters_tensor_dict(training)
        write_checkpoint(run_path(run_dir, step), tensors, meta, overwrite=True)
        write_checkpoint(run_dir / "last.safetensors", tensors, meta, overwrite=True)
        runlog.backup(run_file)
        last_saved[:] = [str(run_path(run_dir, step))]

    with progress_bar(f"{config.mode}-{config.optimizer}", until,
                      enabled=progress_enabled(quiet)) as bar:
        def progress(training: ProjectedTraining, row: Any) -> None:
            info = ""
            if row is not None:
                info = f"loss {row.train_loss:.4g}"
                if not math.isnan(row.chi):
                    info += f"  χ {row.chi:.3f}"
            if training.state.step and training.hvps:
                info += f"  {training.hvps / training.state.step:.1f} HVPs/step"
            bar.update(completed=training.state.step, info=info)

        training = ProjectedTraining(config, experiment, on_log=on_log, on_refresh=on_refresh,
                                     on_save=on_save, progress=progress, on_audit=on_audit)
        if resumed is not None:
            training.load_state(*resumed)
            bar.update(completed=training.state.step)
            say(f"resuming {run_dir} at step {training.state.step}")
        note = mode_note(config, training.dependence)
        if note is not None:
            say(note)
        try:
            stop.raise_if_requested()
            # data-parallel: a signal to any rank stops every rank at the same step
            training.run(until, should_stop=lambda: parallel.any_rank(stop.requested()))
            if training.state.step < until:
                stop.raise_if_requested()
                raise KeyboardInterrupt  # another rank was signalled
        except NumericalError as exc:
            where = last_saved[0] if last_saved else "none was written"
            raise NumericalError(f"{exc}; the last good checkpoint: {where}") from exc
        except StorageError as exc:  # a full disk: what was saved stays resumable
            latest = latest_complete(run_dir)
            if latest is not None:
                exc.args = (f"{exc}; the run is saved up to {latest[0].name}: free some space "
                            f"and continue with `subspace project-train --resume {run_dir}`",)
            raise
        except KeyboardInterrupt:
            if latest_complete(run_dir) is None:
                say(f"interrupted at step {training.state.step}, before the first checkpoint: "
                    "nothing to resume (run the same command again)", always=True)
            else:
                saved = f"saved at step {training.state.step}; " if last_saved and (
                    last_saved[0] == str(run_path(run_dir, training.state.step))) else ""
                say(f"interrupted at step {training.state.step}; {saved}continue with "
                    f"`subspace project-train --resume {run_dir}`", always=True)
            raise
    return summary(run_dir) if main else {}


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM while training: finish the step, save it, then stop."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def requested(self) -> bool:
        return self.signal is not None

    def raise_if_requested(self) -> None:
        if self.signal is not None:
            from subspace_cli.errors import Interrupted

            raise Interrupted(self.signal)


@contextlib.contextmanager
def deferred_interrupts() -> Any:
    """Turn the first SIGINT or SIGTERM into a request that the training loop honours at the
    end of the step (saving it); a second one interrupts at once. Outside the main thread
    (where Python cannot install handlers) signals keep their usual effect."""
    import signal
    import threading

    from subspace_cli.errors import Interrupted
    from subspace_cli.output import say

    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signal is not None:
            raise Interrupted(signum)
        stop.signal = signum
        say("stopping at the end of this step, saving it (again to stop at once)", always=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary: ``report``'s row for it (one implementation of every number), with
    the cost from its newest saved state (exact at the end of a run, whatever --log-every)."""
    from subspace_cli import report

    row = report.summarize(report.load_run(run_dir))
    for key in ("notes", "final_loss_vs_none", "compared_at_step"):  # need other runs
        row.pop(key)
    return {**row, **cost(run_dir)}


def cost(run_dir: Path) -> dict[str, Any]:
    """Steps, HVPs, refreshes and time of a run as of its newest saved state (audits apart)."""
    from subspace_cli.checkpoint import read_checkpoint
    from subspace_cli.projected import RunState

    latest = latest_complete(run_dir)
    state = RunState.from_json(read_checkpoint(latest[1]).metadata["subspace.run_state"]) if (
        latest) else RunState()
    tracker = state.tracker
    hvps = int(tracker.get("refresh_hvps", 0)) + int(tracker.get("check_hvps", 0))
    done = state.step
    return {
        "steps_done": done,
        "hvps": hvps,
        "hvps_per_step": hvps / done if done else None,
        "refreshes": int(tracker.get("refreshes", 0)),
        "wall_seconds": round(state.wall_time, 3),
        "audit_hvps": int(tracker.get("audit_hvps", 0)),
        "audit_seconds": round(state.audit_seconds, 3),
    }
