"""Peer implementations of the same pick, written the way their users would write them.

Every peer answers with the engine's agent on the same fleet and request (tests/test_peers.py), so
the benchmark times the same decision made by different tools. Each peer translates the request
with :func:`scoring.query.build_query` inside the timed call, as the engine does, and then works
from the fleet's columns (or a table copied from them once, before any timing). Peers compute the
pick only (no per-reason counts): the engine does more work per pick than any of them.

Peers implement the default exact-tie rule (``tie_band == 0``) and refuse any other band.
"""
