"""``subspace project-train``: resume training with every update projected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from subspace_cli.commands.common import (
    HVP_METHOD_CHOICES,
    HVP_METHOD_HELP,
    examples,
    is_quiet,
    output_options,
    overrides_from,
    plugin_options,
)


def batch_size_type(value: str) -> int | None:
    if str(value).lower() == "full":
        return None
    try:
        size = int(value)
    except ValueError as exc:
        raise click.BadParameter(f"expected a positive integer or 'full', got {value!r}") from exc
    if size < 1:
        raise click.BadParameter("batch size must be positive")
    return size


@click.command("project-train", epilog=examples("""
  subspace project-train sample_checkpoints/mlp_mnist1d.safetensors --mode bulk --steps 500 --out runs/bulk
  subspace project-train start.safetensors --mode none --steps 2000 --out runs/sgd --save-every 500
  subspace project-train ckpt.safetensors --mode dom --optimizer adam --lr 1e-3 --out runs/dom-adam
  subspace project-train ckpt.safetensors --mode bulk --batch-size full --lr 0.05 --out runs/bulk-gd
  subspace project-train ckpt.safetensors --mode dom --start-when-aligned 0.95 --out runs/switch
  subspace project-train ckpt.safetensors --mode dom --audit-every 20 --out runs/dom-audited
  subspace project-train ckpt.safetensors --mode dom --refresh cold --out runs/dom-paper
  subspace project-train --resume runs/bulk
"""))
@click.argument("checkpoint", required=False)
@click.option("--mode", type=click.Choice(["none", "dom", "bulk", "mix"]), default="none",
              show_default=True,
              help="Keep Δθ (none), P_kΔθ (dom), (I−P_k)Δθ (bulk) or a·P_kΔθ + b·(I−P_k)Δθ (mix).")
@click.option("--optimizer", type=click.Choice(["sgd", "momentum", "nesterov", "adam", "sam"]),
              default="sgd", show_default=True, help="Base optimizer whose update is projected.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01,
              show_default=True, help="Learning rate η.")
@click.option("--batch-size", default="50", show_default=True, metavar="N|full",
              help="Mini-batch size, or 'full' for full-batch gradient descent.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Total steps of the run [default: 1000; with --resume, the stored total].")
@click.option("-k", "k", type=click.IntRange(min=0), default=None,
              help="Dimension of the dominant subspace [default: the number of classes].")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run directory (created; must be empty or absent).")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--momentum", type=float, default=0.9, show_default=True,
              help="Momentum μ (momentum, nesterov).")
@click.option("--beta1", type=float, default=0.9, show_default=True, help="Adam β1.")
@click.option("--beta2", type=float, default=0.999, show_default=True, help="Adam β2.")
@click.option("--eps", type=float, default=1e-8, show_default=True, help="Adam ε.")
@click.option("--rho", type=float, default=0.05, show_default=True, help="SAM radius ρ.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True,
              help="L2 weight decay added to the gradient.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the mini-batch order and the solver's start.")
@click.option("--dom-scale", type=float, default=1.0, show_default=True, help="a of --mode mix.")
@click.option("--bulk-scale", type=float, default=1.0, show_default=True, help="b of --mode mix.")
@click.option("--project-state", is_flag=True,
              help="Also project momentum buffers and Adam's first moment (default: unprojected, "
                   "as in the paper's code).")
@click.option("--refresh", type=click.Choice(["track", "warm", "cold"]), default=None,
              help="How the subspace is kept current: track it within --subspace-tol (adaptive "
                   "warm refreshes and 3-HVP drift checks), or recompute it every "
                   "--refresh-every steps warm-started (warm) or from a random start (cold, the "
                   "paper's recipe) [default: track; warm when --refresh-every is given].")
@click.option("--refresh-every", type=click.IntRange(min=1), default=None,
              help="With --refresh warm or cold: recompute every N steps [default: 1].")
@click.option("--subspace-tol", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=1e-3, show_default=True,
              help="--refresh track: the target on 1 − overlap(subspace in use, exact top-k) at "
                   "every step.")
@click.option("--guard", type=click.IntRange(min=0), default=2, show_default=True,
              help="--refresh track: extra Ritz vectors kept for the next warm refresh and "
                   "watched by the drift check (at least 1).")
@click.option("--max-check-gap", type=click.IntRange(min=1), default=8, show_default=True,
              help="--refresh track: at most N steps between drift checks (3 HVPs each; they "
                   "are sparser while the subspace is far from stale). 1 checks every step, "
                   "which also logs the sharpness u₁ᵀHu₁ at every step.")
@click.option("--audit-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Every M steps, compute the exact top-k subspace by a cold solve at "
                   "--audit-tol and log its overlap with the subspace in use (0: never). Its "
                   "HVPs are counted apart from the run's.")
@click.option("--audit-tol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Residual tolerance of the audit's solve [default: 1e-6 float32, 1e-10 "
                   "float64].")
@click.option("--start-step", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train unprojected until this step.")
@click.option("--start-when-aligned", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None,
              help="Switch to projection when the EMA (factor 0.9) of χ_k of the full-batch "
                   "gradient first exceeds this threshold.")
@click.option("--log-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Append a row to run.h5 every N steps.")
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Write a checkpoint every N steps (and at the end).")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Eigensolver residual tolerance [default: 1e-4 float32, 1e-8 float64].")
@click.option("--max-hvps", type=click.IntRange(min=1), default=None,
              help="HVP budget per subspace refresh.")
@click.option("--block-size", type=click.IntRange(min=1), default=None,
              help="HVPs per batched product in the solver.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per forward/backward pass over the full training set.")
@click.option("--hvp-method", type=click.Choice(HVP_METHOD_CHOICES), default="auto",
              show_default=True, help=HVP_METHOD_HELP)
@plugin_options
@output_options
@click.pass_context
def project_train_command(ctx: click.Context, checkpoint: str | None, out: str | None,
                          resume: str | None, steps: int | None, k: int | None,
                          batch_size: str, model: str | None, model_config: str | None,
                          data: str | None, data_config: str | None, loss: str | None,
                          as_json: bool, **options: Any) -> None:
    """Resume training from CHECKPOINT with every update projected.

    The base optimizer's update Δθ is projected onto the top-k eigenspace
    of the full-training-set Hessian (dom), onto its orthogonal complement
    (bulk), or mixed. By default the subspace is tracked: kept within
    --subspace-tol of the exact top-k subspace at every step by adaptive warm
    refreshes and 3-HVP drift checks (--audit-every M checks that against a
    cold tight solve). Every --log-every steps a row is appended to
    RUN_DIR/run.h5:
    full-batch loss and accuracy, χ_k of the full gradient and of the
    update, the top-k eigenvalues (sharpness λ1 beside 2/η), the norms of
    P_kΔθ and (I−P_k)Δθ, effective learning rates η_dom and η_bulk, time,
    HVPs, the subspace's age and drift estimate and the audited overlap.
    Checkpoints with optimizer and RNG state are written every
    --save-every steps; --resume continues bit-identically after Ctrl-C or
    kill -9.
    """
    from subspace_cli.errors import UsageError

    if options["refresh"] is None:
        options["refresh"] = "warm" if options["refresh_every"] is not None else "track"
    if options["refresh_every"] is None:
        options["refresh_every"] = 1
    if resume:
        if checkpoint or out:
            raise UsageError("--resume RUN_DIR takes no CHECKPOINT or --out")
        summary = resume_run(Path(resume), steps, quiet=is_quiet(ctx))
    else:
        if not checkpoint or not out:
            raise UsageError("give CHECKPOINT and --out RUN_DIR (or --resume RUN_DIR)")
        overrides = overrides_from(model, model_config, data, data_config, loss)
        summary = start_run(Path(checkpoint), Path(out), overrides, steps=steps or 1000, k=k,
                            batch_size=batch_size_type(batch_size), options=options,
                            quiet=is_quiet(ctx))
    from subspace_cli.output import emit_json, emit_table

    if as_json:
        emit_json(summary)
    else:
        emit_table([[key, f"{v:.6g}" if isinstance(v, float) else v]
                    for key, v in summary.items()], headers=["field", "value"])


def start_run(checkpoint: Path, run_dir: Path, overrides: Any, *, steps: int, k: int | None,
              batch_size: int | None, options: dict[str, Any], quiet: bool) -> dict[str, Any]:
    import dataclasses

    from subspace_cli.errors import UsageError
    from subspace_cli.experiment import load_experiment
    from subspace_cli.projected import TrainConfig

    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} is not empty: choose a new --out, or --resume {run_dir}")
    experiment = load_experiment(checkpoint, overrides)
    assert experiment.data is not None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(
        checkpoint=str(checkpoint), steps=steps, batch_size=batch_size,
        k=experiment.data.num_classes if k is None else k,
        **{key: value for key, value in options.items() if key in fields},
    )
    config.check()
    if batch_size is not None and batch_size > len(experiment.data):
        raise UsageError(f"batch size {batch_size} exceeds the {len(experiment.data)} samples")
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = experiment.spec
    stored = {"config": dataclasses.asdict(config), "command": _command(),
              "spec": dataclasses.asdict(spec), "start_step": spec.step or 0,
              "start_sha256": experiment.checkpoint.sha256()}
    (run_dir / "config.json").write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    from subspace_cli import runlog

    runlog.create(run_dir / "run.h5", dataclasses.asdict(config), stored["command"])
    return _drive(run_dir, config, experiment, stored, until=config.steps, resumed=None,
                  quiet=quiet)


def resume_run(run_dir: Path, steps: int | None, *, quiet: bool) -> dict[str, Any]:
    import dataclasses

    from subspace_cli import runlog
    from subspace_cli.checkpoint import SpecOverrides, read_checkpoint
    from subspace_cli.errors import InputError
    from subspace_cli.experiment import load_experiment
    from subspace_cli.projected import RunState, TrainConfig

    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise InputError(f"{run_dir} has no config.json: not a project-train run directory")
    stored = json.loads(config_path.read_text())
    # A run from before the tracker recomputed warm every --refresh-every steps.
    stored["config"].setdefault("refresh", "warm")
    config = TrainConfig(**stored["config"])
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    latest = _latest_complete(run_dir)
    if latest is None:
        raise InputError(f"{run_dir} has no complete checkpoint to resume from")
    weights, state_file = latest
    spec = stored["spec"]
    overrides = SpecOverrides(model=spec["model"] if spec["model_from_user"] else None,
                              data=spec["data"] if spec["data_from_user"] else None)
    experiment = load_experiment(weights, overrides)
    state_ckpt = read_checkpoint(state_file)
    state = RunState.from_json(state_ckpt.metadata["subspace.run_state"])
    runlog.truncate_for_resume(run_dir / "run.h5", state.step)
    return _drive(run_dir, config, experiment, stored, until=config.steps,
                  resumed=(state_ckpt.tensors, state), quiet=quiet)


def _latest_complete(run_dir: Path) -> tuple[Path, Path] | None:
    """The newest step whose weights and state files both exist and read."""
    from subspace_cli.checkpoint import read_checkpoint
    from subspace_cli.errors import CheckpointError

    candidates = sorted(run_dir.glob("step_*.state.safetensors"), reverse=True)
    for state_file in candidates:
        weights = run_dir / state_file.name.replace(".state.safetensors", ".safetensors")
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
           resumed: Any, quiet: bool) -> dict[str, Any]:
    import math

    from subspace_cli import runlog
    from subspace_cli.checkpoint import write_checkpoint
    from subspace_cli.errors import NumericalError
    from subspace_cli.output import progress_bar, progress_enabled, say
    from subspace_cli.projected import ProjectedTraining, parameters_tensor_dict, run_path

    run_file = run_dir / "run.h5"
    start_step = int(stored["start_step"])
    last_saved: list[str] = []

    def on_log(row: Any) -> None:
        runlog.append(run_file, runlog.LOG, [row])

    def on_refresh(row: Any) -> None:
        runlog.append(run_file, runlog.REFRESH, [row])

    def on_audit(row: Any) -> None:
        runlog.append(run_file, runlog.AUDIT, [row])

    def on_save(training: ProjectedTraining) -> None:
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
        try:
            training.run(until)
        except NumericalError as exc:
            where = last_saved[0] if last_saved else "none was written"
            raise NumericalError(f"{exc}; the last good checkpoint: {where}") from exc
        except KeyboardInterrupt:
            say(f"interrupted at step {training.state.step}; continue with "
                f"`subspace project-train --resume {run_dir}`")
            raise
    return summarize_run(run_dir)


def summarize_run(run_dir: Path) -> dict[str, Any]:
    import numpy as np

    from subspace_cli import runlog

    data = runlog.read(run_dir / "run.h5")
    log, cfg, audit = data["log"], data["config"], data["audit"]
    steps = log["step"]
    projecting = log["projecting"].astype(bool)
    chi_after = log["chi"][projecting] if projecting.any() else log["chi"]
    switch = int(steps[projecting][0]) if projecting.any() else None
    return {
        "run_dir": str(run_dir),
        "mode": cfg["mode"],
        "optimizer": cfg["optimizer"],
        "lr": cfg["lr"],
        "batch_size": cfg["batch_size"] if cfg["batch_size"] is not None else "full",
        "k": cfg["k"],
        "steps": cfg["steps"],
        "switch_step": switch,
        "logged_rows": int(len(steps)),
        "start_train_loss": float(log["train_loss"][0]) if len(steps) else None,
        "final_logged_step": int(steps[-1]) if len(steps) else None,
        "final_train_loss": float(log["train_loss"][-1]) if len(steps) else None,
        "final_train_accuracy": float(log["train_accuracy"][-1]) if len(steps) else None,
        "mean_chi": float(np.nanmean(chi_after)) if len(chi_after) and
        not np.isnan(chi_after).all() else None,
        **_cost(run_dir, cfg, audit),
    }


def _cost(run_dir: Path, cfg: dict[str, Any], audit: dict[str, Any]) -> dict[str, Any]:
    """HVPs, time and audits of a run, from its newest saved state and its audit table."""
    import numpy as np

    from subspace_cli.checkpoint import read_checkpoint
    from subspace_cli.projected import RunState

    latest = _latest_complete(run_dir)
    state = RunState.from_json(read_checkpoint(latest[1]).metadata["subspace.run_state"]) if (
        latest) else RunState()
    tracker = state.tracker
    hvps = int(tracker.get("refresh_hvps", 0)) + int(tracker.get("check_hvps", 0))
    done = state.step
    overlaps = np.asarray(audit.get("overlap", []), dtype=float)
    return {
        "refresh": cfg.get("refresh", "warm"),
        "steps_done": done,
        "hvps": hvps,
        "hvps_per_step": hvps / done if done else None,
        "refreshes": int(tracker.get("refreshes", 0)),
        "seconds": round(state.wall_time, 3),
        "audits": int(len(overlaps)),
        "audit_overlap_min": float(overlaps.min()) if len(overlaps) else None,
        "audit_overlap_median": float(np.median(overlaps)) if len(overlaps) else None,
        "audit_hvps": int(tracker.get("audit_hvps", 0)),
        "audit_seconds": round(state.audit_seconds, 3),
    }
