"""Prefect tasks: library calls with declared retries."""
