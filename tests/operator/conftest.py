"""Fixtures for the operator's tests (and, inherited, its e2e tests): the tiny model and data."""

from support.tiny import tiny_data, tiny_model, tiny_records  # noqa: F401
