"""Fixtures for the trainer's tests: the tiny model and data, and S3."""

from support.s3 import s3_server  # noqa: F401
from support.tiny import memorized, tiny_data, tiny_model, tiny_records  # noqa: F401
