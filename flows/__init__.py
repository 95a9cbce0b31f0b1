"""Prefect flows: thin wiring over veiltrain.tasks."""
