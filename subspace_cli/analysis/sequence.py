"""What every analysis over a sequence of checkpoints shares: the data cache, the warm-start
chain, the output file and progress on stderr."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from subspace_cli.checkpoint import SpecOverrides
    from subspace_cli.experiment import Experiment
    from subspace_cli.settings import SpectrumSettings


@dataclass
class WarmStart:
    """Eigenvectors (rows) of the parameters ``names``, and where they came from."""

    names: tuple[str, ...]
    vectors: torch.Tensor
    source: str


class CheckpointSequence(ABC):
    """Checkpoints analysed in order, each warm-started from the one before.

    Subclasses implement :meth:`run` for one checkpoint; the training set is built once per
    (plugin, config) and shared by every checkpoint of the sequence.
    """

    def __init__(
        self,
        settings: SpectrumSettings,
        overrides: SpecOverrides,
        *,
        output: str | None = None,
        overwrite: bool = False,
        quiet: bool = False,
    ) -> None:
        from subspace_cli.experiment import DataCache
        from subspace_cli.output import progress_enabled

        if output:
            from subspace_cli.writable import check_writable

            check_writable(output)  # before any checkpoint is loaded or solved
        self.settings = settings
        self.overrides = overrides
        self.output = output
        self.overwrite = overwrite
        self.show_progress = progress_enabled(quiet)
        self.data_cache = DataCache()
        self.previous: WarmStart | None = None

    def load(self, path: Path) -> Experiment:
        from subspace_cli.experiment import load_experiment

        return load_experiment(path, self.overrides, data_cache=self.data_cache)

    def warm_start_for(self, names: tuple[str, ...]) -> WarmStart | None:
        """The previous checkpoint's eigenvectors, when they cover the same parameters."""
        if self.previous is not None and self.previous.names == names:
            return self.previous
        return None

    def remember(self, names: tuple[str, ...], vectors: torch.Tensor, path: Path) -> None:
        self.previous = WarmStart(tuple(names), vectors, str(path))

    def progress(self, label: str, total: int | None) -> Any:
        from subspace_cli.output import progress_bar

        return progress_bar(label, total, enabled=self.show_progress)

    @abstractmethod
    def run(self, path: Path) -> dict[str, Any]:
        """Analyse one checkpoint; returns its record (the command's JSON object)."""
