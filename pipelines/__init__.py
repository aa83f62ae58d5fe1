"""Pipelines: composition of transforms into runnable Beam jobs, no business logic."""
