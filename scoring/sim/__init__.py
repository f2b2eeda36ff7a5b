"""Fleet simulation: which policy and weights give the shortest waits, the most region matches
and the fewest cold model loads on a fleet, before anything changes in production.

>>> from scoring.sim import SimConfig, compare
>>> results = compare(SimConfig(n_agents=40, n_tasks=500))  # doctest: +SKIP
>>> results["scorer"].metrics["wait_p95_s"]  # doctest: +SKIP

``python -m scoring.sim`` runs the same from the command line (see :mod:`scoring.sim.cli`).
"""

from scoring.sim.agents import AgentSpec, Lifecycle, build_agents
from scoring.sim.catalog import make_policy
from scoring.sim.metrics import format_table, jain
from scoring.sim.policies import ANCHORS, POLICY_NAMES, Policy
from scoring.sim.simulation import SimConfig, SimResult, Transfer, compare, prepare, simulate
from scoring.sim.trace import find_trace, load_latencies, load_trace
from scoring.sim.workload import Task, Workload, synthetic_workload

__all__ = [
    "ANCHORS",
    "POLICY_NAMES",
    "AgentSpec",
    "Lifecycle",
    "Policy",
    "SimConfig",
    "SimResult",
    "Task",
    "Transfer",
    "Workload",
    "build_agents",
    "compare",
    "find_trace",
    "format_table",
    "jain",
    "load_latencies",
    "load_trace",
    "make_policy",
    "prepare",
    "simulate",
    "synthetic_workload",
]
