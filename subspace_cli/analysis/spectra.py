"""``spectrum`` over a sequence of checkpoints: warm starts, overlaps, storage."""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subspace_cli import parallel
from subspace_cli.analysis.sequence import CheckpointSequence

if TYPE_CHECKING:
    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import Experiment
    from subspace_cli.settings import SpectrumSettings


class SpectrumAnalysis(CheckpointSequence):
    """Top-k eigenpairs of each checkpoint, warm-started from the previous one (else from
    ``init_from``'s stored eigenvectors), with the overlap between consecutive subspaces;
    each result is added to ``output`` as soon as it is computed."""

    def __init__(
        self,
        settings: SpectrumSettings,
        overrides: SpecOverrides,
        *,
        init_from: str | None = None,
        output: str | None = None,
        overwrite: bool = False,
        quiet: bool = False,
        per_module: bool = False,
        groups: list[tuple[str, tuple[str, ...]]] | None = None,
    ) -> None:
        super().__init__(settings, overrides, output=output, overwrite=overwrite, quiet=quiet)
        self.init_from = init_from
        #: Diagonal blocks instead of the whole curvature: one per module owning parameters,
        #: or one per named group of parameter globs (``--group NAME=GLOB``).
        self.per_module = per_module
        self.groups = groups
        # --hvp-method auto: the method chosen on the first checkpoint of a model and data,
        # reused for the later ones (choosing costs a few HVPs per checkpoint otherwise)
        self.methods: dict[str, str] = {}

    def run(self, path: Path) -> dict[str, Any]:
        from subspace_cli.spectrum import top_k

        if not self.per_module and not self.groups:
            self._refuse_existing(path, None)
            return self._solve(path, self.load(path), self.settings, None)
        experiment = self.load(path)
        blocks = block_parameters(experiment.model, self.groups)
        for name, _ in blocks:
            self._refuse_existing(path, name)
        records = []
        sizes = dict(experiment.model.named_parameters())
        want = top_k(self.settings, experiment)
        for name, names in blocks:
            n = sum(sizes[p].numel() for p in names)
            k = min(want, n)  # a small block (a bias, a LayerNorm) has fewer pairs
            settings = dataclasses.replace(self.settings, include=tuple(map(glob.escape, names)),
                                           exclude=(), k=k, extra=min(self.settings.extra, n - k))
            records.append(self._solve(path, experiment, settings, name))
        return {"checkpoint": str(path), "blocks": records}

    def _refuse_existing(self, path: Path, block: str | None) -> None:
        from subspace_cli import store
        from subspace_cli.errors import UsageError

        if self.output and not self.overwrite and store.has_group(self.output, path, block):
            what = f"a spectrum of {path}" + (f" block {block}" if block else "")
            raise UsageError(f"{self.output} already holds {what}; pass --overwrite to replace it")

    def _solve(self, path: Path, experiment: Experiment, settings: SpectrumSettings,
               block: str | None) -> dict[str, Any]:
        from subspace_cli import store
        from subspace_cli.eigensolver import subspace_overlap
        from subspace_cli.functional import select_parameters
        from subspace_cli.output import say
        from subspace_cli.spectrum import compute_spectrum, summary, to_stored, top_k

        layout = select_parameters(experiment.model, settings.include, settings.exclude)
        if self.output:  # the group's eigenvectors must fit: checked before the solve
            from subspace_cli.writable import check_space

            vector_bytes = layout.n_params * (8 if settings.dtype == "float64" else 4)
            check_space(self.output, top_k(settings, experiment) * vector_bytes,
                        why=f"; {path} was not solved")
        init, warm = self._warm_start(experiment, layout.names)
        label = path.name + (f" {block}" if block else "")
        with self.progress(label, settings.max_hvps) as bar:

            def progress(hvps: int, residuals: Any) -> None:
                info = "" if residuals is None else f"max residual {float(residuals.max()):.2e}"
                bar.update(completed=hvps, info=f"{hvps} HVPs  {info}")

            key = json.dumps([experiment.spec.model, experiment.spec.model_config,
                              experiment.spec.data, experiment.spec.data_config], sort_keys=True)
            if settings.hvp_method == "auto" and key in self.methods:
                settings = dataclasses.replace(settings, hvp_method=self.methods[key])
            run = compute_spectrum(
                experiment, settings, init=init, warm_start=warm, progress=progress
            )
            if run.hvp_method:
                self.methods.setdefault(key, run.hvp_method)
        vectors = run.result.eigenvectors
        k = run.result.k
        previous = self.warm_start_for(run.layout.names)
        if previous is not None:
            run.overlap_with_previous = subspace_overlap(previous.vectors[:k], vectors[:k])
        self.remember(run.layout.names, vectors, path)
        record = summary(run, experiment)
        if block is not None:
            record["block"] = block
            record["block_parameters"] = list(run.layout.names)
        if self.output and parallel.is_main():  # rank 0 writes for a data-parallel run
            stored = to_stored(run, experiment)
            if block is not None:
                stored.attrs["block"] = block
            record["group"] = store.write_spectrum(self.output, stored, overwrite=self.overwrite)
            record["output"] = self.output
        if record["chunk_dependent"]:
            say(f"note: {path}: in train mode BatchNorm normalises each chunk of "
                f"{settings.chunk_size} samples by its own statistics, so this Hessian depends "
                "on --chunk-size (and on the number of data-parallel processes)")
        unconverged = len(run.result.converged) - sum(run.result.converged)
        if unconverged:
            say(
                f"warning: {path}: {unconverged} of {len(run.result.converged)} pairs did not "
                f"reach tol {run.result.tol:g} within {run.result.hvp_count} HVPs "
                "(raise --max-hvps or --tol)", always=True
            )
        return record

    def _warm_start(self, experiment: Experiment, names: tuple[str, ...]
                    ) -> tuple[Any, str | None]:
        """Start vectors over the parameters ``names``: the previous checkpoint's
        eigenvectors, else --init-from's."""
        from subspace_cli import store

        previous = self.warm_start_for(names)
        if previous is not None:
            return previous.vectors, previous.source
        if not self.init_from:
            return None, None
        import torch

        stored = store.read_spectrum(self.init_from, experiment.checkpoint.path)
        if stored is None or tuple(stored.param_names) != names:
            candidates = [
                s for s in store.iter_spectra(self.init_from) if tuple(s.param_names) == names
            ]
            stored = candidates[-1] if candidates else None
        if stored is None:
            from subspace_cli.output import say

            say(
                f"warning: {self.init_from} has no spectrum over the same parameters; "
                "starting from random vectors", always=True
            )
            return None, None
        return torch.from_numpy(stored.eigenvectors), f"{self.init_from}:{stored.group}"


def block_parameters(model: Any, groups: list[tuple[str, tuple[str, ...]]] | None
                     ) -> list[tuple[str, list[str]]]:
    """The diagonal blocks to solve: each named group's parameters (``--group NAME=GLOB``, in
    the model's order), else one block per module that owns parameters itself."""
    import fnmatch

    from subspace_cli.errors import UsageError

    names = [name for name, _ in model.named_parameters()]
    if groups:
        blocks = []
        for group, globs in groups:
            chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            if not chosen:
                raise UsageError(f"--group {group}={','.join(globs)} matches no parameter")
            blocks.append((group, chosen))
        return blocks
    blocks = []
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{n}" if module_name else n
               for n, _ in module.named_parameters(recurse=False)]
        own = [n for n in own if n in names]  # a tied parameter belongs to its first module
        if own:
            blocks.append((module_name or "(root)", own))
    return blocks

