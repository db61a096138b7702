"""The HTTP read path over the serving file: a small ASGI app (starlette), run by uvicorn.

    GET /v1/feeds/{user_id}?limit=35&cursor=...   one page of a user's feed, as JSON
    GET /v1/health                                 the live generation, its age, row count
    GET /                                          a page to look at one user's feed

Each worker process holds one `FeedReader`: one read-only DuckDB connection that follows
publishes (it reopens when a publish renamed a new file into place), the generation's
lookup file (serving/lookup.py: a page is a binary search and a slice of memory-mapped
arrays, no query) and the safety list beside the file (deleted posts, blocked or muted
authors, posts seen since the build). Handlers are `async` and call the reader directly:
a page takes tens of microseconds, less than a hop to a thread pool, and one event loop
per worker never shares the connection between threads. More throughput comes from more
worker processes.

Pagination stays on one generation: the cursor carries the generation id, the user and
the last position served. When a publish replaced the generation between two pages, the
next page answers 409 with the live generation id, and the client starts again from the
first page; positions of two generations are unrelated, so continuing would skip or
repeat posts.

Input is checked before anything reaches DuckDB (ASCII digits only, ids inside BIGINT,
limits inside [1, MAX_LIMIT], cursors of a fixed shape); every value is a bound
parameter.
"""

from __future__ import annotations

import base64
import binascii
import html
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from feed_dagster.data.schema import ACTIONS
from feed_dagster.serving.page import render_items, render_page
from feed_dagster.serving.read import (
    PAGE_COLUMNS,
    READER_MEMORY,
    FeedNotPublishedError,
    FeedReader,
    Page,
)

DEFAULT_LIMIT = 35
MAX_LIMIT = 200
DEFAULT_STALE_AFTER = timedelta(hours=2)
MAX_ID = 2**63 - 1  # user ids are BIGINT
# ASCII digits only: str.isdigit and int() also accept other scripts' digits ("١٢").
_DIGITS = re.compile(r"[0-9]{1,19}")
_CURSOR = re.compile(r"([0-9a-f]{1,64})\.([0-9]{1,19})\.([0-9]{1,9})")
_COL = {c: i for i, c in enumerate(PAGE_COLUMNS)}
# The probability columns sit side by side in PAGE_COLUMNS, in ACTIONS order: one slice.
_PROBS = slice(_COL[f"p_{ACTIONS[0]}"], _COL[f"p_{ACTIONS[-1]}"] + 1)
assert PAGE_COLUMNS[_PROBS] == tuple(f"p_{a}" for a in ACTIONS)

# Environment for `app_from_env`, the factory uvicorn calls in every worker process.
ENV_PATH = "FEED_DAGSTER_SERVING_FILE"
ENV_STALE = "FEED_DAGSTER_STALE_AFTER_SECONDS"
ENV_MEMORY = "FEED_DAGSTER_READER_MEMORY"


class BadRequest(ValueError):
    """Malformed input: answered with 422 and this message."""


def parse_user_id(raw: str) -> int:
    if raw.startswith("-") and _DIGITS.fullmatch(raw[1:]):
        raise BadRequest(f"user_id must be >= 0, got {raw}")
    if not _DIGITS.fullmatch(raw):
        raise BadRequest(f"user_id must be a non-negative integer, got {_quote(raw)}")
    value = int(raw)
    if value > MAX_ID:
        raise BadRequest(f"user_id must be at most {MAX_ID}, got {_quote(raw)}")
    return value


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}, got {_quote(raw)}")
    return int(raw)


def encode_cursor(generation_id: str, user_id: int, after: int) -> str:
    raw = f"{generation_id}.{user_id}.{after}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(raw: str) -> tuple[str, int, int]:
    """(generation_id, user_id, after) of a cursor made by `encode_cursor`."""
    bad = BadRequest(f"cursor is not one this service issued: {_quote(raw)}")
    if len(raw) > 200:
        raise bad
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise bad from None
    m = _CURSOR.fullmatch(text)
    if m is None:
        raise bad
    return m.group(1), int(m.group(2)), int(m.group(3))


def _quote(raw: str, keep: int = 40) -> str:
    """Echo user input shortened and repr-quoted, never whole (it may be megabytes)."""
    return repr(raw[:keep] + ("..." if len(raw) > keep else ""))


class GenerationChanged(Exception):
    """The cursor's generation is no longer live."""

    def __init__(self, cursor_generation: str, live_generation: str) -> None:
        super().__init__(
            f"the feeds were republished (generation {cursor_generation} -> "
            f"{live_generation}); start again from the first page, without a cursor"
        )
        self.live_generation = live_generation


class UnknownUser(LookupError):
    pass


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def item_json(row: tuple[Any, ...], meta: dict[str, Any]) -> dict[str, Any]:
    """One feed row as the API shows it (`meta`: the generation it was read from)."""
    return {
        "position": row[_COL["position"]],
        "post": {"article_id": row[_COL["article_id"]], "title": row[_COL["title"]]},
        "author": {"author_id": row[_COL["author_id"]], "handle": row[_COL["author_handle"]]},
        "source": row[_COL["source"]],
        "score": row[_COL["score"]],
        "probabilities": dict(zip(ACTIONS, row[_PROBS], strict=True)),
        "dwell_seconds": row[_COL["dwell_seconds"]],
        "reason": row[_COL["reason"]],
        "model_version": meta.get("model_version"),
        "vector_table_version": meta.get("vector_table_version"),
    }


class FeedService:
    """What the routes need, without HTTP: one reader, the page logic, health."""

    def __init__(
        self,
        serving_path: str | Path | None = None,
        stale_after: timedelta = DEFAULT_STALE_AFTER,
        memory_limit: str = READER_MEMORY,
        use_lookup: bool = True,
    ) -> None:
        self.reader = FeedReader(serving_path, memory_limit, use_lookup)
        self.stale_after = stale_after
        self._examples: tuple[str | None, list[int]] = (None, [])

    def page(self, user_id: int, limit: int, cursor: str | None) -> tuple[Page, str | None]:
        """One page and the cursor of the next (None at the end)."""
        after = 0
        if cursor is not None:
            generation, cursor_user, after = decode_cursor(cursor)
            if cursor_user != user_id:
                raise BadRequest(f"cursor belongs to user {cursor_user}, not {user_id}")
        page = self.reader.page(user_id, limit, after)
        live = page.meta.get("generation_id", "")
        if cursor is not None and generation != live:
            raise GenerationChanged(generation, live)
        if not page.user_known:
            raise UnknownUser(
                f"user {user_id} has no feed in generation {live} (unknown user, or a user "
                "published without any post)"
            )
        next_cursor = None
        if page.has_more and page.rows:
            next_cursor = encode_cursor(live, user_id, page.rows[-1][_COL["position"]])
        return page, next_cursor

    def health(self, now: datetime | None = None) -> dict[str, Any]:
        meta = self.reader.meta()
        now = now or datetime.now(UTC).replace(tzinfo=None)  # meta times are naive UTC
        published = meta.get("published_at")
        age = (now - published).total_seconds() if published else None
        stale = age is None or age > self.stale_after.total_seconds()
        return {
            "status": "stale" if stale else "ok",
            "generation_id": meta.get("generation_id"),
            "published_at": _iso(published),
            "generated_at": _iso(meta.get("generated_at")),
            "age_seconds": age,
            "stale_after_seconds": self.stale_after.total_seconds(),
            "rows": meta.get("rows"),
            "users": meta.get("users"),
            "model_version": meta.get("model_version"),
            "vector_table_version": meta.get("vector_table_version"),
            # "lookup file ..." normally; "duckdb (why)" when pages come from queries.
            "read_path": self.reader.read_path,
        }

    def example_users(self, n: int = 6) -> list[int]:
        """A few users with full feeds, for the page; computed once per generation."""
        meta = self.reader.meta()
        generation = meta.get("generation_id")
        if self._examples[0] != generation:
            self._examples = (generation, self.reader.example_users(n))
        return self._examples[1]


def _json(body: Any, status: int = 200) -> Response:
    # orjson: a page of 35 rows encodes ~10x faster than with the json module, a visible
    # share of a request's CPU time (docs/BENCHMARKS.md, serve).
    return Response(
        orjson.dumps(body, default=str),
        status_code=status,
        media_type="application/json",
    )


def _error(status: int, message: str, **extra: Any) -> Response:
    return _json({"error": message, **extra}, status)


def create_app(
    serving_path: str | Path | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    page_size: int = DEFAULT_LIMIT,
    memory_limit: str = READER_MEMORY,
    use_lookup: bool = True,
) -> Starlette:
    """The ASGI app over `serving_path` (None: the serving file under FEED_DAGSTER_DATA);
    one FeedReader per app (per worker process).
    `page_size`: posts per page of the HTML page (the API takes `limit`);
    `memory_limit`: the reader's DuckDB buffer pool;
    `use_lookup`: False answers every page with a DuckDB query (to compare the two)."""
    service = FeedService(serving_path, stale_after, memory_limit, use_lookup)

    async def feed(request: Request) -> Response:
        try:
            user_id = parse_user_id(request.path_params["user_id"])
            limit = parse_limit(request.query_params.get("limit"))
            page, next_cursor = service.page(user_id, limit, request.query_params.get("cursor"))
        except BadRequest as exc:
            return _error(422, str(exc))
        except GenerationChanged as exc:
            return _error(409, str(exc), generation_id=exc.live_generation)
        except UnknownUser as exc:
            return _error(404, str(exc))
        except FeedNotPublishedError as exc:
            return _error(503, str(exc))
        meta = page.meta
        return _json(
            {
                "user_id": user_id,
                "generation_id": meta.get("generation_id"),
                "generated_at": _iso(meta.get("generated_at")),
                "model_version": meta.get("model_version"),
                "vector_table_version": meta.get("vector_table_version"),
                "items": [item_json(r, meta) for r in page.rows],
                "next_cursor": next_cursor,
            }
        )

    async def health(request: Request) -> Response:
        try:
            return _json(service.health())
        except FeedNotPublishedError as exc:
            return _json({"status": "unavailable", "error": str(exc)}, 503)

    async def index(request: Request) -> Response:
        raw_user = request.query_params.get("user")
        cursor = request.query_params.get("cursor")
        fragment = request.query_params.get("fragment") == "1"
        try:
            examples = service.example_users()
        except FeedNotPublishedError as exc:
            return HTMLResponse(render_page(error=str(exc)), 503)
        if not raw_user:
            return HTMLResponse(render_page(examples=examples))
        status, error, page, next_cursor, user_id = 200, None, None, None, None
        try:
            user_id = parse_user_id(raw_user.strip())
            page, next_cursor = service.page(user_id, page_size, cursor)
        except BadRequest as exc:
            status, error = 422, str(exc)
        except GenerationChanged as exc:
            status, error = 409, str(exc)
        except UnknownUser as exc:
            status, error = 404, str(exc)
        if fragment:
            # The "more" button's request: just the next items and the next link.
            if page is None or user_id is None:
                return HTMLResponse(f"<p class='error'>{html.escape(error or '')}</p>", status)
            return HTMLResponse(render_items(page.rows, user_id, next_cursor))
        return HTMLResponse(
            render_page(
                examples=examples,
                user=raw_user,
                user_id=user_id,
                page=page,
                next_cursor=next_cursor,
                error=error,
            ),
            status,
        )

    routes = [
        Route("/", index),
        Route("/v1/health", health),
        Route("/v1/feeds/{user_id}", feed),
    ]
    app = Starlette(routes=routes)
    app.state.service = service
    return app


def app_from_env() -> Starlette:
    """The factory uvicorn calls in each worker (`feed-dagster serve` sets the env)."""
    path = os.environ.get(ENV_PATH)  # unset: the serving file under FEED_DAGSTER_DATA
    stale = float(os.environ.get(ENV_STALE, DEFAULT_STALE_AFTER.total_seconds()))
    memory = os.environ.get(ENV_MEMORY, READER_MEMORY)
    return create_app(path, timedelta(seconds=stale), memory_limit=memory)
