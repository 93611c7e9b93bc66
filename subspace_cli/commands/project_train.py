"""``subspace project-train``: resume training with every update projected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from subspace_cli.commands.common import (
    HVP_METHOD_HELP,
    Finite,
    build_limits,
    examples,
    is_quiet,
    output_options,
    overrides_from,
    plugin_options,
)
from subspace_cli.projected import OPTIMIZERS
from subspace_cli.projection import MODES
from subspace_cli.settings import CURVATURES, DTYPES, HVP_METHODS
from subspace_cli.tracking import POLICIES


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
@click.option("--mode", type=click.Choice(MODES), default="none",
              show_default=True,
              help="Keep Δθ (none), P_kΔθ (dom), (I−P_k)Δθ (bulk) or a·P_kΔθ + b·(I−P_k)Δθ (mix).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS),
              default="sgd", show_default=True, help="Base optimizer whose update is projected.")
@click.option("--lr", type=Finite(min=0, min_open=True), default=0.01,
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
@click.option("--momentum", type=Finite(), default=0.9, show_default=True,
              help="Momentum μ (momentum, nesterov).")
@click.option("--beta1", type=Finite(), default=0.9, show_default=True, help="Adam β1.")
@click.option("--beta2", type=Finite(), default=0.999, show_default=True, help="Adam β2.")
@click.option("--eps", type=Finite(), default=1e-8, show_default=True, help="Adam ε.")
@click.option("--rho", type=Finite(), default=0.05, show_default=True, help="SAM radius ρ.")
@click.option("--weight-decay", type=Finite(), default=0.0, show_default=True,
              help="L2 weight decay added to the gradient.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the mini-batch order and the solver's start.")
@click.option("--dom-scale", type=Finite(), default=1.0, show_default=True, help="a of --mode mix.")
@click.option("--bulk-scale", type=Finite(), default=1.0, show_default=True, help="b of --mode mix.")
@click.option("--project-state", is_flag=True,
              help="Also project momentum buffers and Adam's first moment (default: unprojected, "
                   "as in the paper's code).")
@click.option("--refresh", type=click.Choice(POLICIES), default=None,
              help="How the subspace is kept current: track it within --subspace-tol (adaptive "
                   "warm refreshes and 3-HVP drift checks), or recompute it every "
                   "--refresh-every steps warm-started (warm) or from a random start (cold, the "
                   "paper's recipe) [default: track; warm when --refresh-every is given].")
@click.option("--refresh-every", type=click.IntRange(min=1), default=None,
              help="With --refresh warm or cold: recompute every N steps [default: 1].")
@click.option("--subspace-tol", type=Finite(0, 1, min_open=True, max_open=True),
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
@click.option("--audit-tol", type=Finite(min=0, min_open=True), default=None,
              help="Residual tolerance of the audit's solve [default: 1e-6 float32, 1e-10 "
                   "float64].")
@click.option("--start-step", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train unprojected until this step.")
@click.option("--start-when-aligned", type=Finite(0, 1, min_open=True, max_open=True),
              default=None,
              help="Switch to projection when the EMA (factor 0.9) of χ_k of the full-batch "
                   "gradient first exceeds this threshold.")
@click.option("--log-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Append a row to run.h5 every N steps.")
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Write a checkpoint every N steps (and at the end).")
@click.option("--tol", type=Finite(min=0, min_open=True), default=None,
              help="Eigensolver residual tolerance [default: 1e-4 float32, 1e-8 float64].")
@click.option("--max-hvps", type=click.IntRange(min=1), default=None,
              help="HVP budget per subspace refresh.")
@click.option("--block-size", type=click.IntRange(min=1), default=None,
              help="HVPs per batched product in the tracker's and the audits' block Lanczos "
                   "solves [default: 2].")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32",
              show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per forward/backward pass over the full training set.")
@click.option("--hvp-method", type=click.Choice(HVP_METHODS), default="auto",
              show_default=True, help=HVP_METHOD_HELP)
@click.option("--curvature", type=click.Choice(CURVATURES), default="hessian",
              show_default=True,
              help="The matrix whose top-k eigenspace is the dominant subspace: the Hessian, "
              "the Gauss–Newton matrix (ggn), the empirical Fisher, or the covariance of the "
              "mini-batch gradient at --batch-size (gradient-covariance, DOME's subspace).")
@click.option("--train-mode", is_flag=True,
              help="Measure (full-batch loss, accuracy, gradient, χ, the Hessian) in train "
              "mode; default eval mode. Training steps are always in train mode, and a "
              "measurement never changes a buffer.")
@click.option("--allow-dropout", is_flag=True,
              help="With --train-mode, measure a model with dropout anyway (refused without).")
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
    from subspace_cli import rundir
    from subspace_cli.errors import UsageError

    if options["refresh"] is None:
        options["refresh"] = "warm" if options["refresh_every"] is not None else "track"
    if options["refresh_every"] is None:
        options["refresh_every"] = 1
    if resume:
        if checkpoint or out:
            raise UsageError("--resume RUN_DIR takes no CHECKPOINT or --out")
        summary = rundir.resume(Path(resume), steps, quiet=is_quiet(ctx),
                                limits=build_limits(ctx))
    else:
        if not checkpoint or not out:
            raise UsageError("give CHECKPOINT and --out RUN_DIR (or --resume RUN_DIR)")
        overrides = overrides_from(model, model_config, data, data_config, loss)
        summary = rundir.start(Path(checkpoint), Path(out), overrides, steps=steps or 1000, k=k,
                               batch_size=batch_size_type(batch_size), options=options,
                               quiet=is_quiet(ctx))
    from subspace_cli.output import emit_json, emit_table

    if as_json:
        emit_json(summary)
    else:
        emit_table([[key, f"{v:.6g}" if isinstance(v, float) else v]
                    for key, v in summary.items()], headers=["field", "value"])
