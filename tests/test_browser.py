"""In a real browser (Playwright driving Debian's `chromium`): the feed page with
pagination, a delete reaching the page without a republish, and the Dagster UI
materialising an asset group on a tiny world.

A failing test leaves a full-page screenshot in $FEED_DAGSTER_TEST_ARTIFACTS (default:
<tmp>/feed_dagster-test-artifacts). FEED_DAGSTER_README_SCREENSHOT=1 also refreshes
docs/feed-page.png, the README's picture of the page.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from serving_helpers import ServerThread, free_port, get

from feed_dagster.incoming import ingest_batches, pending_batches
from feed_dagster.paths import safety_path_for
from feed_dagster.serving import read_meta
from feed_dagster.serving.http import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)",
)
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(
    os.environ.get(
        "FEED_DAGSTER_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "feed_dagster-test-artifacts"
    )
)
PAGE_SIZE = 5


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield b
        b.close()


@pytest.fixture()
def page(browser, request):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    yield pg
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"{request.node.name}.png"
        pg.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the failure: {shot}")
    context.close()


def user_with_longest_feed(feeds: pl.DataFrame) -> int:
    counts = feeds.group_by("user_id").len().sort(["len", "user_id"], descending=[True, False])
    return int(counts["user_id"][0])


def dom_articles(page) -> list[int]:
    return [
        int(a)
        for a in page.locator("li.item").evaluate_all("els => els.map(e => e.dataset.article)")
    ]


def test_feed_page_shows_a_users_feed_and_pages(page, serving, feeds) -> None:
    user = user_with_longest_feed(feeds)
    full = feeds.filter(pl.col("user_id") == user).sort("position")
    assert full.height > 2 * PAGE_SIZE
    with ServerThread(create_app(serving, page_size=PAGE_SIZE)) as srv:
        _, api = get(f"{srv.base}/v1/feeds/{user}?limit={PAGE_SIZE}")
        page.goto(srv.base + "/")
        assert page.locator(".examples a").count() >= 3
        page.fill("#user", str(user))
        page.click("button[type=submit]")
        page.wait_for_selector("li.item")
        items = page.locator("li.item")
        assert items.count() == PAGE_SIZE
        assert dom_articles(page) == full["article_id"].to_list()[:PAGE_SIZE]
        first = items.nth(0)
        assert first.locator(".title").inner_text() == api["items"][0]["post"]["title"]
        assert f"@{api['items'][0]['author']['handle']}" in first.locator(".byline").inner_text()
        assert first.locator(".reason").inner_text() == api["items"][0]["reason"]
        source = api["items"][0]["source"].replace("_", " ")
        assert first.locator(".badge").inner_text() == source
        bars = first.locator(".bar")
        assert bars.count() == 4
        probs = api["items"][0]["probabilities"]
        top = max(probs, key=probs.get)
        assert bars.nth(0).get_attribute("data-action") == top
        width = bars.nth(0).locator(".fill").evaluate("e => e.getBoundingClientRect().width")
        track = bars.nth(0).locator(".track").evaluate("e => e.getBoundingClientRect().width")
        assert width == pytest.approx(track * probs[top], abs=1.5)
        header = page.locator("#generation").inner_text()
        assert read_meta(serving)["generation_id"] in header and "model m1" in header
        if os.environ.get("FEED_DAGSTER_README_SCREENSHOT"):
            page.screenshot(path=str(ROOT / "docs" / "feed-page.png"), full_page=True)

        # "More" appends the next page in place, until the end of the feed.
        url = page.url
        pages = 1
        while page.locator("#more").count():
            page.click("#more")
            pages += 1
            page.wait_for_function(
                f"document.querySelectorAll('li.item').length >= "
                f"{min(pages * PAGE_SIZE, full.height)}"
            )
        page.wait_for_selector(".end")
        assert dom_articles(page) == full["article_id"].to_list()
        assert pages == -(-full.height // PAGE_SIZE) and page.url == url

        # Without the script, "More" is a plain link to the next page.
        page.goto(f"{srv.base}/?user={user}")
        href = page.locator("#more").get_attribute("href")
        page.goto(srv.base + href)
        assert dom_articles(page) == full["article_id"].to_list()[PAGE_SIZE : 2 * PAGE_SIZE]

        # An example user is one click away; a bad id says why.
        example = page.locator(".examples a").first
        chosen = int(example.inner_text())
        example.click()
        page.wait_for_selector("li.item")
        assert dom_articles(page)[0] == int(
            feeds.filter((pl.col("user_id") == chosen) & (pl.col("position") == 1))["article_id"][0]
        )
        page.fill("#user", "12abc")
        page.click("button[type=submit]")
        assert "user_id must be a non-negative integer" in page.locator(".error").inner_text()


def test_a_deleted_post_leaves_the_page_without_a_republish(
    page, tmp_path, server, serving, feeds, tiny_world, warehouse
) -> None:
    user = user_with_longest_feed(feeds)
    mine = feeds.filter(pl.col("user_id") == user).sort("position")
    victim = int(mine["article_id"][1])
    generation = read_meta(serving)["generation_id"]
    page.goto(f"{server.base}/?user={user}")
    assert page.locator(f'li.item[data-article="{victim}"]').count() == 1
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pl.DataFrame(
        {"article_id": [victim], "deleted_at": [tiny_world.now]},
        schema={"article_id": pl.Int64, "deleted_at": pl.Datetime("us")},
    ).write_parquet(incoming / "deletions-1.parquet")
    ingest_batches(warehouse, pending_batches(incoming), safety_path_for(serving))
    page.reload()
    page.wait_for_selector("li.item")
    assert page.locator(f'li.item[data-article="{victim}"]').count() == 0
    assert dom_articles(page) == [a for a in mine["article_id"].to_list() if a != victim]
    assert generation in page.locator("#generation").inner_text()  # same generation


# --- the Dagster UI ---------------------------------------------------------------------

GROUP = "social_graph"  # the tiny world's source load and follow-graph stats: seconds
ASSET = "follow_graph"


# Only the run the test launches: runs that schedules or sensors request (the hourly
# refresh fires on the hour, the retrain at 03:00) stay queued and never start.
DAGSTER_YAML = """
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
    tag_concurrency_limits:
      - key: dagster/schedule_name
        limit: 0
      - key: dagster/sensor_name
        limit: 0
"""


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    """`dagster dev` on a free port, with its own DAGSTER_HOME and data root, on the tiny
    world; steps run in the run's process (FEED_DAGSTER_EXECUTOR=in_process)."""
    base = tmp_path_factory.mktemp("dagster_ui")
    home, data = base / "home", base / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "FEED_DAGSTER_DATA": str(data),
        "FEED_DAGSTER_SOURCE": "synthetic:tiny",
        "FEED_DAGSTER_EXECUTOR": "in_process",
    }
    log = (base / "dagster-dev.log").open("w")
    # Its own session: the webserver, daemon and code servers are one process group, so
    # the whole tree can be stopped at the end.
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/server_info", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dagster dev did not start; log: {(base / 'dagster-dev.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        log.close()


def test_materialize_a_group_from_the_dagster_ui(page, dagster_ui, tiny_world) -> None:
    page.set_default_timeout(60_000)
    # On localhost the UI opens a first-visit newsletter dialog at an unpredictable moment,
    # possibly under another dialog where it cannot be clicked away. The UI keeps its
    # dismissal in localStorage ("communityNux"): set it before any page script runs.
    page.add_init_script("window.localStorage.setItem('communityNux', 'true')")
    page.goto(f"{dagster_ui}/locations/feed_dagster/asset-groups/{GROUP}")
    materialize = page.get_by_role("button", name="Materialize all")
    materialize.click()
    # follows, blocks, ... come from the source multi-asset, which loads as one: the UI
    # asks to confirm materialising its other outputs too.
    confirm = page.get_by_role("button", name="Confirm")
    confirm.click(timeout=15_000)
    # The "Launched run <id>" toast links to the run's page.
    toast = page.locator("[data-sonner-toast]", has_text="Launched run")
    toast.get_by_role("link", name="View").click()
    page.wait_for_url("**/runs/*")
    page.get_by_text("Success", exact=True).first.wait_for(timeout=150_000)
    if os.environ.get("FEED_DAGSTER_DEBUG_SCREENSHOTS"):
        page.screenshot(path=str(ARTIFACTS / "dagster-run.png"))

    # The asset's page shows the metadata the run reported: the row count (one row per
    # account) and the follower-distribution plot, a PNG inside a markdown value.
    page.goto(f"{dagster_ui}/assets/{ASSET}")
    row_count = page.locator("xpath=//span[text()='Row count']/following-sibling::*[1]")
    assert row_count.inner_text().replace(",", "").strip() == str(tiny_world.users.height)
    row = page.locator("tr", has=page.get_by_text("in_degree_ccdf", exact=True))
    row.get_by_text("[Show Markdown]").click()
    plot = page.locator("img[src^='data:image/png']").first
    plot.wait_for()
    assert plot.evaluate("img => img.complete && img.naturalWidth > 100")
    if os.environ.get("FEED_DAGSTER_DEBUG_SCREENSHOTS"):
        page.screenshot(path=str(ARTIFACTS / "dagster-plot.png"))
