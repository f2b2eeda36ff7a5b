"""The platform's API server (DESIGN section 10): ``python -m scoring.server --help``.

Needs the ``server`` extra (FastAPI, uvicorn, SQLAlchemy, PyJWT, httpx).
"""

from scoring.server.app import build_state, create_app
from scoring.server.config import Settings

__all__ = ["Settings", "build_state", "create_app"]
