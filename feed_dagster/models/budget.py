"""Training budgets: how much of a world the models learn from and are evaluated on.

A world's impression log grows with its users (62M rows at 100k users), but a ranker learns
what it can from tens of thousands of slates: training time and memory must follow a
budget, not the size of the world. The sample is drawn in DuckDB, so only the sampled
impressions ever reach Python:

- training and validation slates: uniform samples of whole impressions from each period
  (the validation period is the last `valid_fraction` of the pre-held-out time span, as in
  `retrieval_data.temporal_split`);
- held-out evaluation: every held-out impression of a fixed-size random sample of users
  (per-user metrics stay comparable across world sizes);
- two-tower positives: a uniform sample of the positive engagements before the validation
  start (`retrieval_data.build_retrieval_examples(max_examples=...)`).

Past `whole_max_engagements`, even the engagements are not read whole (165M rows at 1M
users): only the sampled impressions' users' own rows (their histories, labels and
per-user counts; the two-tower's positives are drawn from them), their follows, and the
rows on the posts the held-out impressions show (the baselines' per-post counts). What
every user's rows decide stays in the warehouse (models.warehouse_engagements).

The choice is a seeded hash of the ids, so the same warehouse and budget give the same
sample. Worlds within the budget (the demo world) are read whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import HELDOUT_USERS_SQL, connect_read_only, select_sql


@dataclass(frozen=True)
class TrainingBudget:
    # The demo world has 45,773 training and 4,960 validation slates and 3,000 users: it
    # fits whole, so its models and figures do not change with the budget.
    train_slates: int = 60_000
    valid_slates: int = 6_000
    heldout_users: int = 5_000
    # Two-tower positives per training run (the demo world has about 150k).
    retrieval_positives: int = 400_000
    # Two-tower positives of the validation and held-out periods (recall is measured on a
    # few thousand queries; the demo world has about 15k and 27k, so they stay whole).
    retrieval_eval_positives: int = 50_000
    valid_fraction: float = 0.1
    seed: int = 0
    # Worlds with at most this many engagements train the two-tower in its own process while
    # this one fits the classic peers and builds the ranker's groups. Bigger worlds build the
    # groups first and train the two models side by side: the peer fits' peak and the
    # two-tower process's would otherwise add up (at 100k users, 20.8M engagements, the
    # two together passed 8 GiB). The models are the same either way.
    overlap_max_engagements: int = 5_000_000
    # Worlds with more engagements train on the sampled slates' users' own rows (the 100k
    # world, 20.8M engagements, is read whole; the 1M world, 165M, is not).
    whole_max_engagements: int = 50_000_000

    def __post_init__(self) -> None:
        for name in (
            "train_slates",
            "valid_slates",
            "heldout_users",
            "retrieval_positives",
            "retrieval_eval_positives",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"training budget: {name} must be >= 1")
        for name in ("overlap_max_engagements", "whole_max_engagements"):
            if getattr(self, name) < 0:
                raise ValueError(f"training budget: {name} must be >= 0")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError("training budget: valid_fraction must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingSample:
    """What a budget kept: the validation start it was cut at, and per period the number of
    impressions (slates) sampled and available."""

    valid_start: datetime | None
    kept: dict[str, int]
    available: dict[str, int]
    # Engagement rows in the warehouse, and the rows read (of the sampled users only, when
    # fewer: see `users_only`).
    engagements: int = 0
    engagements_read: int = 0
    users: int = 0  # distinct users of the sampled impressions
    # Whether the engagements (and follows) read are the sampled users' own rows only.
    users_only: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            **{
                f"{period}_{what}": counts.get(period, 0)
                for what, counts in (("sampled", self.kept), ("available", self.available))
                for period in ("train", "valid", "heldout")
            },
            "sampled_users": self.users,
            "engagements_read": self.engagements_read,
            "engagements_available": self.engagements,
            "users_only": self.users_only,
        }


# Every impression once, with the period it belongs to.
_PERIODS_SQL = """
with imp as (
    select impression_id, any_value(user_id) as user_id, min(shown_at) as shown_at,
           bool_or(is_heldout) as heldout
    from main.impressions group by impression_id
),
bounds as (
    select epoch_us(min(shown_at)) as t0, epoch_us(max(shown_at)) as t1
    from imp where not heldout
)
select impression_id, user_id, shown_at,
       case when heldout then 'heldout'
            when $valid_fraction > 0 and epoch_us(shown_at)
                 >= (select t0 + floor((t1 - t0) * (1 - $valid_fraction)) from bounds)
                then 'valid'
            else 'train' end as period
from imp
"""

# The budget's share of each period: whole impressions, by a seeded hash of their ids. Each
# period's first n by hash is a top-n query, which DuckDB answers with a heap: at 1M users
# (41M impressions) 3.2 s against 69.5 s for numbering every impression of its period in
# hash order (row_number() over a sort), the same sample.
_SAMPLE_SQL = f"""
with heldout_users as ({HELDOUT_USERS_SQL} limit $heldout_users)
(select impression_id, period from periods where period = 'train'
 order by hash(impression_id, $seed), impression_id limit $train_slates)
union all
(select impression_id, period from periods where period = 'valid'
 order by hash(impression_id, $seed), impression_id limit $valid_slates)
union all
(select impression_id, period from periods
 where period = 'heldout' and user_id in (select user_id from heldout_users))
"""

# A users-only read's rows of a table: the sampled impressions' users' own.
_USERS_ONLY = {
    "engagements": "{} semi join sampled_users using (user_id)",
    "follows": "{} where follower_id in (select user_id from sampled_users)",
    "topic_follows": "{} semi join sampled_users using (user_id)",
}
# Everyone's engagements on the posts the sampled held-out impressions show.
HELDOUT_POST_ENGAGEMENTS = "engagements_on_heldout_posts"
_ON_HELDOUT_POSTS = """{} where article_id in (
    select distinct i.article_id from main.impressions i
    semi join (select impression_id from sampled where period = 'heldout') using (impression_id)
)"""


def read_training_tables(
    path: Location,
    names: list[str],
    budget: TrainingBudget,
    columns: dict[str, list[str]] | None = None,
) -> tuple[dict[str, pl.DataFrame], TrainingSample]:
    """Warehouse tables `names` for training, with `impressions` (and `impression_truth`)
    cut to the budget's sample of whole impressions; every other table is read whole, or
    only the columns `columns` names for it. (The exposure counts over every impression are
    built in DuckDB: models.exposures.)

    Past the budget's `whole_max_engagements`, `engagements`, `follows` and `topic_follows`
    hold the sampled users' own rows only (`TrainingSample.users_only`), and the tables
    gain HELDOUT_POST_ENGAGEMENTS: every user's engagements on the posts the held-out
    sample shows."""
    con = connect_read_only(path)
    try:
        con.execute(
            f"create temp table periods as {_PERIODS_SQL}",
            {"valid_fraction": budget.valid_fraction},
        )
        con.execute(
            f"create temp table sampled as {_SAMPLE_SQL}",
            {
                "seed": budget.seed,
                "heldout_users": budget.heldout_users,
                "train_slates": budget.train_slates,
                "valid_slates": budget.valid_slates,
            },
        )
        count = "select period, count(*) from {} group by period"
        available = dict(con.execute(count.format("periods")).fetchall())
        kept = dict(con.execute(count.format("sampled")).fetchall())
        # The first validation impression of the whole log (not of the sample), so the
        # split of the sampled rows is the split of the world.
        start = con.execute("select min(shown_at) from periods where period = 'valid'").fetchone()
        con.execute(
            "create temp table sampled_users as select distinct user_id from periods "
            "semi join sampled using (impression_id)"
        )
        n_users = con.execute("select count(*) from sampled_users").fetchone()[0]
        n_engagements = 0
        if "engagements" in names:
            n_engagements = con.execute("select count(*) from main.engagements").fetchone()[0]
        users_only = n_engagements > budget.whole_max_engagements
        tables = {}
        for name in names:
            select = select_sql(name, (columns or {}).get(name))
            if name in ("impressions", "impression_truth"):
                query = f'select t.* from main."{name}" t semi join sampled using (impression_id)'
            elif users_only and name in _USERS_ONLY:
                query = _USERS_ONLY[name].format(f"select * from ({select})")
            else:
                query = select
            tables[name] = con.execute(query).pl()
        if users_only:
            select = select_sql("engagements", (columns or {}).get("engagements"))
            tables[HELDOUT_POST_ENGAGEMENTS] = con.execute(
                _ON_HELDOUT_POSTS.format(f"select * from ({select})")
            ).pl()
    finally:
        con.close()
    read = tables["engagements"].height if "engagements" in tables else 0
    return tables, TrainingSample(
        valid_start=start[0],
        kept=kept,
        available=available,
        engagements=int(n_engagements),
        engagements_read=int(read),
        users=int(n_users),
        users_only=users_only,
    )
