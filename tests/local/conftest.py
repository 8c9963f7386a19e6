"""Fixtures for `mot run`, `mot validate` and `mot estimate`: the tiny model and data, S3 and the
shared `mot run` manifest and --compare run."""

from support.local_run import compare_run, local_manifest  # noqa: F401
from support.s3 import s3_server  # noqa: F401
from support.tiny import tiny_data, tiny_model, tiny_records  # noqa: F401
