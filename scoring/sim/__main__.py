"""``python -m scoring.sim``: compare dispatch policies on a simulated fleet."""

from scoring.sim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
