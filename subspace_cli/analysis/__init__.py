"""Analyses over a sequence of checkpoints: the library calls behind ``spectrum`` and ``align``.

Each analysis takes checkpoints one at a time, in order (a trajectory), warm-starts each solve
from the previous checkpoint's eigenvectors, stores what it computed, and returns a record (the
command's JSON object) for the command to render. See ``docs/ARCHITECTURE.md``.
"""

from subspace_cli.analysis.alignment import ALIGN_SUBGROUPS, AlignmentAnalysis
from subspace_cli.analysis.sequence import CheckpointSequence
from subspace_cli.analysis.spectra import SpectrumAnalysis

__all__ = ["ALIGN_SUBGROUPS", "AlignmentAnalysis", "CheckpointSequence", "SpectrumAnalysis"]
