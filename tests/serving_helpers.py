"""Helpers for the HTTP and browser tests: a tiny published world and a real uvicorn server
on a free 127.0.0.1 port, in a thread of the test process."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import uvicorn

from feed_dagster.data.world_tables import world_info
from feed_dagster.pipeline import (
    PipelineStats,
    PopularityRetriever,
    TopicAffinityScorer,
    run_pipeline,
)
from feed_dagster.serving import publish_feeds

N_USERS = 60


def table_feeds(tables, n_users: int = N_USERS) -> tuple[pl.DataFrame, PipelineStats]:
    """(feeds, stats) of the first `n_users` users by the table-only retriever and scorer."""
    users = tables["users"]["user_id"].sort().to_numpy()[:n_users]
    return run_pipeline(
        tables,
        users,
        tables["world_info"]["now"][0],
        PopularityRetriever.from_tables(tables),
        TopicAffinityScorer.from_tables(tables),
    )


def tiny_feeds(world, n_users: int = N_USERS) -> pl.DataFrame:
    out, _ = table_feeds({"world_info": world_info(world, "test"), **world.tables()}, n_users)
    assert out.height
    return out


def publish(feeds: pl.DataFrame, path: Path, world, model_version: str = "m1") -> str:
    return publish_feeds(
        feeds,
        path,
        model_version=model_version,
        vector_table_version="v1",
        generated_at=datetime(2026, 1, 7),
        articles=world.articles,
        users=world.users,
    ).generation_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 from a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def get(url: str) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET, for any status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            status, body, kind = r.status, r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get_content_type()
    text = body.decode()
    return status, json.loads(text) if kind == "application/json" else text
