"""The HTML page at `/`: one user's feed as a readable list, rendered on the server.

Plain HTML and CSS; the only script makes "More" append the next page in place (it asks
the same URL with `fragment=1` and gets just the items), and the page works without it.
Everything that comes from data or the request is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

from feed_dagster.data.schema import ACTIONS
from feed_dagster.serving.read import PAGE_COLUMNS, Page

_COL = {c: i for i, c in enumerate(PAGE_COLUMNS)}
TOP_ACTIONS = 4  # bars per post: the most likely actions
SOURCES = {"in_network": "in network", "out_of_network": "out of network"}

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 46rem; padding: 1rem;
       color: #1d2329; background: #f6f7f9; }
h1 { font-size: 1.3rem; margin: 0 0 .6rem; }
form { display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; }
input[type=text] { font: inherit; padding: .3rem .5rem; width: 9rem; }
button, .examples a { font: inherit; padding: .3rem .7rem; }
.examples { margin: .4rem 0 1rem; color: #556; }
.examples a { background: #e4e8ee; border-radius: 1rem; text-decoration: none; color: inherit;
              padding: .1rem .6rem; margin-right: .2rem; }
.meta { font-size: .85rem; color: #556; margin: .5rem 0; }
.error { background: #fde8e8; border: 1px solid #e99; padding: .5rem .8rem; }
ol.feed { list-style: none; padding: 0; margin: 0; }
li.item { background: #fff; border: 1px solid #dde2e8; border-radius: .5rem;
          padding: .6rem .8rem; margin: .5rem 0; display: grid;
          grid-template-columns: 2.2rem 1fr 11rem; gap: .2rem .8rem; }
.pos { color: #889; font-size: 1.1rem; grid-row: span 3; }
.title { font-weight: 600; }
.byline, .reason { font-size: .88rem; color: #445; }
.badge { font-size: .75rem; border-radius: .6rem; padding: 0 .45rem; margin-left: .3rem; }
.in_network { background: #dff3e4; color: #14532d; }
.out_of_network { background: #e0ebff; color: #1e3a8a; }
.bars { grid-column: 3; grid-row: 1 / span 3; font-size: .75rem; align-self: center; }
.bar { display: grid; grid-template-columns: 5.5rem 1fr 2.4rem; align-items: center;
       gap: .3rem; }
.track { background: #eef1f4; height: .55rem; border-radius: .3rem; overflow: hidden; }
.fill { background: #4f7cc7; height: 100%; }
.val { text-align: right; color: #556; }
#more { display: inline-block; margin: .6rem 0 2rem; }
.end { color: #778; margin: .6rem 0 2rem; }
"""

SCRIPT = """
document.addEventListener('click', async (ev) => {
  const more = ev.target.closest('#more');
  if (!more) return;
  ev.preventDefault();
  more.textContent = 'Loading...';
  const res = await fetch(more.dataset.fragment);
  const box = document.createElement('div');
  box.innerHTML = await res.text();
  const list = document.querySelector('ol.feed');
  box.querySelectorAll('li.item').forEach((li) => list.appendChild(li));
  const next = box.querySelector('#more, .end, .error');
  more.replaceWith(next || document.createTextNode(''));
});
"""


def _url(**params: Any) -> str:
    return "/?" + urlencode({k: v for k, v in params.items() if v is not None})


def _bars(row: tuple[Any, ...]) -> str:
    probs = [(a, row[_COL[f"p_{a}"]]) for a in ACTIONS]
    probs = sorted(((a, float(p)) for a, p in probs if p is not None), key=lambda x: -x[1])
    out = []
    for action, p in probs[:TOP_ACTIONS]:
        width = max(0.0, min(1.0, p)) * 100
        out.append(
            f'<div class="bar" data-action="{escape(action)}">'
            f"<span>{escape(action.replace('_', ' '))}</span>"
            f'<span class="track"><span class="fill" style="width:{width:.1f}%;'
            f'display:block"></span></span><span class="val">{p:.2f}</span></div>'
        )
    return f'<div class="bars" title="top action probabilities">{"".join(out)}</div>'


def render_item(row: tuple[Any, ...]) -> str:
    source = row[_COL["source"]] or ""
    handle = row[_COL["author_handle"]]
    author = f"@{handle}" if handle else f"author {row[_COL['author_id']]}"
    if row[_COL["author_id"]] is None and not handle:
        author = "no author"
    title = row[_COL["title"]] or f"post {row[_COL['article_id']]}"
    return (
        f'<li class="item" data-article="{int(row[_COL["article_id"]])}" '
        f'data-position="{int(row[_COL["position"]])}">'
        f'<span class="pos">{int(row[_COL["position"]])}</span>'
        f'<span class="title">{escape(str(title))}</span>'
        f"{_bars(row)}"
        f'<span class="byline">{escape(author)}'
        f'<span class="badge {escape(source)}">{escape(SOURCES.get(source, source))}</span>'
        f" · score {float(row[_COL['score']]):.3f}</span>"
        f'<span class="reason">{escape(str(row[_COL["reason"]] or ""))}</span></li>'
    )


def render_items(rows: list[tuple[Any, ...]], user_id: int, next_cursor: str | None) -> str:
    """The items of one page and the link to the next (or the end marker)."""
    items = "".join(render_item(r) for r in rows)
    if next_cursor:
        href = _url(user=user_id, cursor=next_cursor)
        frag = _url(user=user_id, cursor=next_cursor, fragment=1)
        tail = f'<a id="more" href="{escape(href)}" data-fragment="{escape(frag)}">More</a>'
    else:
        tail = '<p class="end">End of the feed.</p>'
    return f'<ol class="feed">{items}</ol>{tail}'


def render_page(
    examples: list[int] | None = None,
    user: str | None = None,
    user_id: int | None = None,
    page: Page | None = None,
    next_cursor: str | None = None,
    error: str | None = None,
) -> str:
    """The whole page: the user picker, then the feed, an error, or nothing yet."""
    chips = "".join(f'<a href="{_url(user=u)}">{u}</a>' for u in examples or [])
    body = [
        "<h1>feed_dagster: a user's feed</h1>",
        '<form method="get" action="/"><label for="user">User id</label>'
        f'<input type="text" id="user" name="user" inputmode="numeric" '
        f'value="{escape(user or "")}" autocomplete="off">'
        '<button type="submit">Show feed</button></form>',
        f'<div class="examples">Examples: {chips or "none"}</div>',
    ]
    if error:
        body.append(f'<p class="error" role="alert">{escape(error)}</p>')
    if page is not None:
        m = page.meta
        body.append(
            '<p class="meta" id="generation">'
            f"user {user_id} · generation "
            f"<code>{escape(str(m.get('generation_id')))}</code>"
            f" · model {escape(str(m.get('model_version')))}"
            f" · vectors {escape(str(m.get('vector_table_version')))}"
            f" · generated {escape(str(m.get('generated_at')))} UTC</p>"
        )
        if page.rows and user_id is not None:
            body.append(render_items(page.rows, user_id, next_cursor))
        else:
            body.append('<p class="end">Nothing to show: every post was removed since.</p>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>feed_dagster feed</title><style>{STYLE}</style></head><body>"
        + "".join(body)
        + f"<script>{SCRIPT}</script></body></html>"
    )
