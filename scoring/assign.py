"""Queue assignment: a queue of requests onto the fleet's free slots, in one atomic call.

DESIGN section 9. Requests are taken oldest ``submitted_at`` first, and each placement reserves its
slot before the next request is considered, so a batch never over-fills an agent.

With ``policy.locality_wait_s == 0`` the result is exactly a loop of :meth:`Fleet.dispatch` in that
order. With a locality wait it is delay scheduling (Zaharia et al., EuroSys 2010) with warm-first
matching, in two passes over the queue:

1. Oldest first. A request older than the bound (``now - submitted_at >= locality_wait_s``) is
   placed as ``dispatch`` would place it: it is never deferred nor passed over. A younger request
   with required models takes the best free eligible agent that has all of them cached, if there
   is one; otherwise, if some agent of its pool that fails only ``capacity`` has them cached, it is
   deferred (``Decision.deferred``, naming those agents), as long as fewer requests of its
   template were deferred before it than ``policy.deferrals_per_slot`` times those agents' busy
   slots. Anything else waits for pass 2.
2. The requests left (young, and cold on every free agent) are placed oldest first on what
   remains, as ``dispatch`` would place them.

A request stamped after ``now`` (``submitted_at > now``: a client's or replica's clock ahead of
the dispatcher's) is never deferred: its age is not below zero, and letting a future stamp count
as "young" would let a request stamped in year 9999 wait on every call, or defer with
``locality_wait_s == 0``. It still takes its place in the oldest-first order by its stamp. The
reference (:func:`scoring.reference.assign`) follows the same rule.

So a freed slot goes to a run whose model is cached there before one that would load cold, and a
cold run still takes a slot that no warm run wanted in the same call. The bound on deferrals per
busy slot keeps a burst of runs for one hot model from all waiting out the budget for the few
slots that have it: each busy slot frees when its one run ends, so only that many runs can be
served warm soon; the others load cold at once, which also puts the model on more agents.

Requests sharing their pool and requirements are grouped, so the whole queue costs one scan of
each group's pool plus O(log n) per placement (:mod:`scoring._assign_kernels`), not a scan per
request.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

import numpy as np

from scoring import _assign_kernels as A
from scoring import _kernels as K
from scoring.decision import Decision, decided
from scoring.fleet import Fleet
from scoring.layout import Query
from scoring.models import QUEUE_ENTRY, DispatchRequest, ScoringPolicy
from scoring.pick import candidates, check_call
from scoring.query import Parts, assemble, translation


def assign(
    fleet: Fleet,
    requests: Iterable[DispatchRequest],
    policy: ScoringPolicy | None = None,
    now: float | Any = None,
) -> list[Decision]:
    """Place a queue of requests onto free slots, atomically (DESIGN section 9).

    Parameters
    ----------
    fleet : Fleet
        Placed requests reserve a slot (``running_count`` + 1, an ``idle`` agent turns ``busy``).
    requests : iterable of DispatchRequest
        The waiting queue, in any order; ``submitted_at`` ``None`` means submitted ``now``.
    policy : ScoringPolicy, optional
        ``None`` means ``ScoringPolicy()``; its ``locality_wait_s`` bounds deferrals.
    now : float or datetime, optional
        Seconds since the epoch; ``None`` means the current time.

    Returns
    -------
    list of Decision
        One per request, in the order given: placed (``agent_id``), deferred (``deferred``), or
        neither, when no free eligible agent was left for it.
    """
    requests, policy, now = check_call(fleet, requests, policy, now)
    with fleet.lock, _cycles_uncollected():
        if not requests:
            return []
        template_ids, tie_hashes, submitted = _entries(requests, now)
        order = None
        if not (submitted[1:] >= submitted[:-1]).all():  # a queue usually comes in order
            order = np.argsort(submitted, kind="stable")  # stable: ties by index
            requests = [requests[i] for i in order.tolist()]
            template_ids, tie_hashes = template_ids[order], tie_hashes[order]
            submitted = submitted[order]
        batch = _Batch(fleet, requests, template_ids, tie_hashes, submitted, policy, now)
        state = batch.run(np.ones(len(requests), bool), second_pass=False)
        later = state == A.LATER
        if later.any():
            batch.run(later, second_pass=True)
        return batch.decisions(order)


def _entries(requests: list[DispatchRequest], now: float) -> tuple[np.ndarray, ...]:
    """The requests' template ids, tie key hashes and submission times (``now`` for none), as
    arrays (views of their :attr:`DispatchRequest.queue_entry` joined)."""
    entries = np.frombuffer(b"".join([r.queue_entry for r in requests]), QUEUE_ENTRY)
    submitted = entries["submitted_at"].copy()
    submitted[np.isnan(submitted)] = now
    return entries["template_id"], entries["tie_key_hash"], submitted


@contextmanager
def _cycles_uncollected() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one call.

    A call makes about three tracked objects per request (the Decision and its tuples), none in a
    reference cycle; for a queue of 10,000 that triggered collections of the caller's whole heap
    every other call (assign plus putting the slots back: 87 ms a call with the collector on,
    38 ms paused, on the 10,000-agent benchmark fleet). Paused, the allocations still count, so
    the collector runs once, soon after, instead of dozens of times within. A collector already
    off stays off. The switch is process-wide: another thread that turns the collector off while
    a call runs finds it on again when the call ends.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Group(NamedTuple):
    query: Query
    parts: Parts
    has_models: bool  # its requests may be deferred for a warm agent
    template: tuple[Any, ...]


class _Batch:
    """One ``assign`` call's groups, heaps and outcomes (used under the fleet's lock)."""

    def __init__(
        self,
        fleet: Fleet,
        queue: list[DispatchRequest],
        template_ids: np.ndarray,
        tie_hashes: np.ndarray,
        submitted: np.ndarray,
        policy: ScoringPolicy,
        now: float,
    ) -> None:
        self.fleet, self.policy, self.now = fleet, policy, now
        # one group per template id, numbered in the ids' order; first: a request of each
        _, first, req_group = np.unique(template_ids, return_index=True, return_inverse=True)
        groups: list[_Group] = []
        for i in first.tolist():
            r = queue[i]
            parts = translation(fleet, r, policy)
            groups.append(_Group(assemble(fleet, r, parts, now), parts,
                                 bool(r.required_models), r.template))  # fmt: skip
        self.groups, self.req_group, self.req_hash = groups, req_group.astype(np.int64), tie_hashes
        self._pack()
        n, wait = len(queue), policy.locality_wait_s
        has_models = np.array([g.has_models for g in groups], bool)[req_group]
        age = now - submitted  # negative for a stamp after now: never young (module docstring)
        self.young = has_models & (age >= 0.0) & (age < wait) if wait > 0 else np.zeros(n, bool)
        self.out = (
            np.zeros(n, np.int64),  # state
            np.full(n, -1, np.int64),  # row
            np.full(n, np.nan),  # score
            np.full((n, K.N_FACTORS), np.nan),  # factors
            np.zeros(n, np.int64),  # eligible
            np.zeros((n, K.N_REASONS), np.int64),  # counts
            np.zeros(n, np.int64),  # version of the group's counts and eligible (see _assign)
        )

    def _pack(self) -> None:
        qs = [g.query for g in self.groups]
        n_groups = len(qs)
        q0 = qs[0]
        self.common = (q0.now, q0.heartbeat_timeout_s, q0.weights, q0.tie_band,
                       self.fleet.shared_rows(), q0.fleet_size)  # fmt: skip
        ex_off = np.zeros(n_groups + 1, np.int64)
        ex_off[1:] = np.cumsum([q.excluded.shape[0] for q in qs])
        rows_off = np.zeros(n_groups + 1, np.int64)
        rows_off[1:] = np.cumsum([q.rows.shape[0] for q in qs])
        self.packed = (
            np.array([q.team for q in qs], np.int64),
            np.array([q.community for q in qs], bool),
            np.stack([q.labels for q in qs]),
            np.array([q.labels_unknown for q in qs], bool),
            np.array([q.min_vram for q in qs], np.int64),
            ex_off,
            np.concatenate([q.excluded for q in qs]).astype(np.int64),
            np.stack([q.models for q in qs]),
            np.array([q.n_models for q in qs], np.int64),
            np.stack([q.region_table for q in qs]),
            np.stack([q.gpu_table for q in qs]),
            rows_off,
            np.concatenate([q.rows for q in qs]).astype(np.int32),
        )
        pool = np.array([q.rows.shape[0] + q.shared.shape[0] for q in qs], np.int64)
        base = np.zeros(n_groups, np.int64)
        base[1:] = np.cumsum(pool)[:-1]
        total = int(pool.sum())
        self.heap = (np.empty(total), np.empty(total, np.int64), base, np.zeros(n_groups, np.int64))
        self.warm = (np.empty(total), np.empty(total, np.int64), base, np.zeros(n_groups, np.int64),
                     np.zeros(n_groups, np.int64))  # fmt: skip
        # Deferrals are bounded per template, not per group: equal templates may be numbered
        # apart (scoring.models.Numbering), and then they are two groups of one template.
        templates: dict[tuple[Any, ...], int] = {}
        template = [templates.setdefault(g.template, len(templates)) for g in self.groups]
        self.deferrals = (self.policy.deferrals_per_slot, np.array(template, np.int64),
                          np.zeros(len(templates), np.int64),
                          np.full(len(self.groups), -1, np.int64))  # fmt: skip
        self.warm_rows = np.empty(total, np.int64)
        self.counts = np.zeros((n_groups, K.N_REASONS), np.int64)
        self.labels_and = np.full((n_groups, q0.labels.shape[0]), K._ALL)
        self.considered = np.zeros(n_groups, np.int64)
        self.eligible = np.zeros(n_groups, np.int64)
        width = int(pool.max()) if n_groups else 0
        self.ties = (np.empty(max(width, 1), np.int64), np.empty(max(width, 1)))
        A._init_groups(self.fleet.columns, self.common, self.packed, self.heap, self.warm,
                       self.warm_rows, self.counts, self.labels_and, self.considered,
                       self.eligible)  # fmt: skip
        self.counts[:, K.POOL] = len(self.fleet) - self.considered  # outsiders, once
        self.versions = np.arange(n_groups, dtype=np.int64)
        self.busy: dict[int, list[str]] = {}  # the warm agents a group's deferrals wait for
        self.missing = [
            group.parts.missing(self.labels_and[g])
            if self.counts[g, K.LABELS] else ()
            for g, group in enumerate(self.groups)
        ]  # fmt: skip

    def run(self, select: np.ndarray, second_pass: bool) -> np.ndarray:
        """Place the selected requests (in queue order); returns every request's state.

        The second pass places the requests the first left for later, on any free agent.
        """
        positions = np.flatnonzero(select)
        later = np.full(len(positions), second_pass)
        every = len(positions) == len(select)  # then the kernel writes the outcomes in place
        sub = self.out if every else tuple(
            np.empty((len(positions), *a.shape[1:]), a.dtype) for a in self.out)  # fmt: skip
        parts = (self.req_group, self.req_hash, self.young)
        group, tie, young = parts if every else tuple(a[positions] for a in parts)
        A._assign(self.fleet.columns, self.common, self.packed, group, tie, young, later,
                  self.heap, self.warm, self.warm_rows, self.deferrals, self.counts, self.eligible,
                  self.versions, *self.ties, sub)  # fmt: skip
        if not every:
            for whole, part in zip(self.out, sub, strict=True):
                whole[positions] = part
        return self.out[0]

    def decisions(self, order: np.ndarray | None) -> list[Decision]:
        """Every request's Decision, at its caller's position (``order[i]`` for queue entry i;
        ``None``: the queue's own order).

        Requests left waiting with the same outcome share one Decision object (a snapshot, never
        changed: equal values need not be separate objects). Their outcome is their state and
        the version of their group's counts when they were considered (``_assign`` numbers every
        change of a group's counts and eligible uniquely), one integer to sort.
        """
        state, version = self.out[0], self.out[6]
        out = np.empty(len(state), object)
        placed = np.flatnonzero(state == A.PLACED)
        if placed.size:
            out[placed] = self._placed(placed)
        rest = np.flatnonzero(state != A.PLACED)
        if rest.size:
            outcome = version[rest] * 4 + state[rest]
            _, first, inverse = np.unique(outcome, return_index=True, return_inverse=True)
            made = np.empty(first.size, object)
            made[:] = self._waiting(rest[first])
            out[rest] = made[inverse]
        if order is not None:
            out[order] = out.copy()
        return out.tolist()

    def _placed(self, placed: np.ndarray) -> list[Decision]:
        """The Decisions of the placed requests at queue positions ``placed``."""
        _, rows, scores, factors, eligible, counts, _ = self.out
        groups = self.req_group[placed].tolist()
        considered, missing = self.considered.tolist(), self.missing
        rows_placed = rows[placed].tolist()
        return [
            decided(agent, score, f, e, rejected, considered[g], missing[g], row)
            for agent, row, score, f, e, rejected, g in zip(
                self.fleet.agent_ids_at(rows_placed), rows_placed, scores[placed].tolist(),
                _packed(factors[placed]), eligible[placed].tolist(), _packed(counts[placed]),
                groups, strict=True,
            )
        ]  # fmt: skip

    def _waiting(self, at: np.ndarray) -> list[Decision]:
        """The Decisions of the requests at queue positions ``at``, none of them placed."""
        state, _, _, _, eligible, counts, _ = self.out
        considered, missing = self.considered.tolist(), self.missing
        made = []
        outcomes = zip(self.req_group[at].tolist(), state[at].tolist(), eligible[at].tolist(),
                       counts[at].tolist(), strict=True)  # fmt: skip
        for g, s, e, rejected in outcomes:
            deferred = s == A.DEFERRED  # the same at the end of the call as when deferred:
            if deferred and g not in self.busy:  # no slot frees during a call
                self.busy[g] = self._busy_warm(g)
            waiting = self.busy[g] if deferred else ()
            made.append(Decision(None, None, (), e, rejected, considered[g], missing[g],
                                 deferred=deferred, waiting_for=waiting))  # fmt: skip
        return made

    def _busy_warm(self, g: int) -> list[str]:
        """The pool's warm agents that fail only ``capacity`` (what a deferral waits for)."""
        q = self.groups[g].query
        rows, masks, _, _ = candidates(self.fleet, q)
        base, n = int(self.warm[2][g]), int(self.warm[4][g])
        warm = set(self.warm_rows[base : base + n].tolist())
        busy = rows[masks == A.CAPACITY_BIT]
        return sorted(self.fleet.agent_id_at(int(r)) for r in busy if int(r) in warm)


def _packed(rows: np.ndarray) -> list[bytes]:
    """Each row of a 2-d array as the bytes of its values (see :func:`scoring.decision.decided`):
    a void view's ``tolist`` cuts them in one C loop."""
    rows = np.ascontiguousarray(rows)
    packed = rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).ravel()
    return cast(list[bytes], packed.tolist())
