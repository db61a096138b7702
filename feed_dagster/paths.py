"""Where the project keeps its files: one data root, overridable by FEED_DAGSTER_DATA, and
the layout of every store below it. The artifacts many machines share (the warehouse
tables, the vector table, the shard files, the article embeddings) can live in a bucket
instead, named by FEED_DAGSTER_ARTIFACTS_URI."""

import abc
import os
from dataclasses import dataclass
from pathlib import Path

from feed_dagster.artifacts import Location, as_location, check_reachable, is_remote, join


def data_root() -> Path:
    """The storage root (default ./data); every store lives below it unless configured."""
    return Path(os.environ.get("FEED_DAGSTER_DATA", "data")).resolve()


# The model store's root when the model store resource sets none: a local path or an object
# store URL such as s3://bucket/prefix (default: models_dir() below).
MODELS_URI_VARIABLE = "FEED_DAGSTER_MODELS_URI"

# The root of the vector table, the shard files and the article embeddings when they do not
# live under the storage root: a local path or an object store URL such as s3://bucket/prefix.
ARTIFACTS_URI_VARIABLE = "FEED_DAGSTER_ARTIFACTS_URI"

# The two models' names in the model store (their directories under the store root).
TWO_TOWER, RANKER = "two_tower", "ranker"

SAFETY_SUFFIX = ".safety.parquet"


def safety_path_for(serving_path: str | Path) -> Path:
    """Where the safety list of a serving file lives: `feeds.duckdb` -> `feeds.safety.parquet`."""
    serving_path = Path(serving_path)
    return serving_path.with_name(serving_path.stem + SAFETY_SUFFIX)


class StorageLayout(abc.ABC):
    """Where each store lives below one storage root, written once: the storage resource
    (feed_dagster/resources/storage.py) and `DataRoot` both supply `data_root()` and take
    every other path from here, so the asset graph and the `feed-dagster` commands that
    read its outputs without Dagster always agree."""

    @abc.abstractmethod
    def data_root(self) -> Path:
        """The root every other path is below; each implementation says where it is."""

    def warehouse_path(self) -> Location:
        """Where the warehouse tables live, decided here for every writer and reader: the
        DuckDB file under the storage root, or, when the artifacts root is a bucket, the
        prefix `<artifacts root>/warehouse` holding one Parquet object per table (DuckDB
        writes only local files, and workers on other machines share only the bucket;
        see feed_dagster/data/warehouse_store.py)."""
        artifacts = self.artifacts_root()
        if is_remote(artifacts):
            return join(artifacts, "warehouse")
        return self.data_root() / "warehouse.duckdb"

    def models_dir(self) -> Path:
        """The model store's root (weights + config per version, PROMOTED pointers)."""
        return self.data_root() / "models"

    def evaluation_dir(self) -> Path:
        """Held-out evaluation tables of every trained ranker, one Parquet per version."""
        return self.models_dir() / "evaluations"

    def serving_peers_dir(self) -> Path:
        """Classic-peer fits shared by the steps of a build (metrics.fit_store) and the peer
        scores the ranker reads as inputs at serving time, cached from them."""
        return self.models_dir() / "serving_peers"

    def artifacts_root(self) -> Location:
        """The root of the vector table, the shard files and the article embeddings:
        FEED_DAGSTER_ARTIFACTS_URI (read when a path is asked for, like FEED_DAGSTER_DATA),
        else the storage root. A URL (s3://...) is returned as a string, a path as a Path."""
        configured = os.environ.get(ARTIFACTS_URI_VARIABLE, "").strip()
        return as_location(configured) if configured else self.data_root()

    def artifacts_setting(self) -> str:
        """Which setting chose `artifacts_root`, for error messages."""
        if os.environ.get(ARTIFACTS_URI_VARIABLE, "").strip():
            return ARTIFACTS_URI_VARIABLE
        return "the storage root (FEED_DAGSTER_DATA)"

    def check_artifacts(self) -> None:
        """Raise ArtifactsUnavailable, naming the setting, unless the artifacts' bucket
        exists and answers (nothing to check for a local root)."""
        check_reachable(self.artifacts_root(), self.artifacts_setting())

    def lancedb_uri(self) -> str:
        return str(join(self.artifacts_root(), "lancedb"))

    def embeddings_path(self) -> Location:
        # A Parquet file, not a warehouse table: see feed_dagster/embeddings/stored.py.
        return join(self.artifacts_root(), "embeddings", "article_embeddings.parquet")

    def incoming_dir(self) -> Path:
        """Where new Parquet batches of posts and engagements are dropped for the sensor."""
        return self.data_root() / "incoming"

    def shard_dir(self) -> Location:
        """One Parquet file of feeds per user shard."""
        return join(self.artifacts_root(), "feeds", "shards")

    def serving_path(self) -> Path:
        """The serving DuckDB file readers query; replaced atomically on every publish."""
        return self.data_root() / "serving" / "feeds.duckdb"

    def serving_bucket(self) -> Location | None:
        """Where each published generation also goes when the artifacts root is a bucket,
        for readers on other machines (`<artifacts root>/serving`, see
        feed_dagster/serving/bucket.py); None when the artifacts are local."""
        artifacts = self.artifacts_root()
        return join(artifacts, "serving") if is_remote(artifacts) else None

    def safety_path(self) -> Path:
        """Deleted posts and block/mute edges readers drop at read time, beside the serving
        file (written by the ingest; see feed_dagster/serving/safety.py)."""
        return safety_path_for(self.serving_path())

    def run_failures_log(self) -> Path:
        return self.data_root() / "logs" / "run_failures.jsonl"


@dataclass(frozen=True)
class DataRoot(StorageLayout):
    """The layout below a root given as a path."""

    root: Path

    def data_root(self) -> Path:
        return self.root


def serving_path() -> Path:
    """The serving file under the current data root (FEED_DAGSTER_DATA)."""
    return DataRoot(data_root()).serving_path()
