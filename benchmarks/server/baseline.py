"""The ceiling of this stack: a plain FastAPI endpoint that only inserts the row.

``python -m benchmarks.server.baseline --port P --database sqlite:///PATH [--http h11|httptools]
[--loop asyncio|uvloop]``: ``POST /run`` decodes the JSON body and inserts one row (an id, the
body, a time) in its own transaction on SQLAlchemy's default pool, with the same SQLite settings
as the server (WAL, ``synchronous=NORMAL``), answering 202 with the id. No authentication, no
validation, no dispatch: what is left is uvicorn, FastAPI and one committed insert.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import JSON, Column, Float, MetaData, String, Table, create_engine, event

metadata = MetaData()
runs = Table(
    "runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("body", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)


def create_app(database: str) -> FastAPI:
    kwargs: dict[str, Any] = {}
    if database.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 2.0}
    engine = create_engine(database, **kwargs)
    if database.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    metadata.create_all(engine)
    app = FastAPI()

    def insert(body: Any) -> str:
        run_id = str(uuid.uuid4())
        with engine.begin() as conn:
            conn.execute(runs.insert().values(id=run_id, body=body, created_at=time.time()))
        return run_id

    @app.post("/run", status_code=202)
    async def run(request: Request) -> dict[str, str]:
        body = json.loads(await request.body())
        return {"task_id": await run_in_threadpool(insert, body)}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--http", default="h11")
    p.add_argument("--loop", default="asyncio")
    args = p.parse_args()
    uvicorn.run(create_app(args.database), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, http=args.http, loop=args.loop)  # fmt: skip


if __name__ == "__main__":
    main()
