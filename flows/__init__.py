"""Prefect flows: the tournament and the preparation of the default model family."""
