"""Shared test setup: the environment every test process runs under.

Fixtures live in tests/support/<name>.py (each module lists the ones it exports in FIXTURES); the
conftest.py of each test folder imports those its tests use (and those fixtures depend on), so a
folder's tests load only the support they need (the planner's tests need none of the e2e stack)."""

import os

# Two cores: torch threads in concurrent processes fight; keep every process to its share.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
