"""Research drivers on top of the fleet simulation: weight sweeps and searches
(:mod:`~scoring.research.sweep`), the goal table (:mod:`~scoring.research.goals`), many
simulations at once on Dask (:mod:`~scoring.research.cluster`) and experiments on cold placement
(:mod:`~scoring.research.emulate`, whose ``cold:`` policies this import registers in the
simulator's catalogue).

Imports go one way: this package uses :mod:`scoring.sim`; the simulator never imports it.
"""

from scoring.research import emulate  # noqa: F401  (registers the cold: policies)
