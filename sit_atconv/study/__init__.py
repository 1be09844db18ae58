"""Mixer studies: attention vs ATConv vs hybrid (or any subset), several seeds, equal steps or equal
wall-clock, FID along the way, mean ± sample std per mixer (`python -m sit_atconv.study`).

`grid` runs the cells (ordinary run folders) and skips or resumes them; `budget` plans steps and evaluation
points; `measure` times training (the equal-seconds calibration) and sampling; `stats` is the pure statistics;
`report` reads the cells' own numbers back into results.json / results.md; `plots` draws the PNGs.
"""

from .budget import Budget
from .grid import Cell, StudySpec, grid_cells, run_study

__all__ = ["Budget", "Cell", "StudySpec", "grid_cells", "run_study"]
