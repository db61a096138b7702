"""Dagster resources: configuration objects that wrap the core."""
