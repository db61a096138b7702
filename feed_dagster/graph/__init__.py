"""Follow-graph statistics and degree-distribution summaries (core; no dagster)."""
