"""Thin Dagster assets: load inputs, call one core function, write, report metadata."""
