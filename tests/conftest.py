"""Shared test setup. Fixtures live in tests/support/<name>.py; each module lists the fixtures it
exports in FIXTURES and they are made available to every test here."""

import importlib
import os
from pathlib import Path

# Two cores: torch threads in concurrent processes fight; keep every process to its share.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

for _path in sorted((Path(__file__).parent / "support").glob("*.py")):
    if _path.stem.startswith("_"):
        continue
    _module = importlib.import_module(f"support.{_path.stem}")
    globals().update({name: getattr(_module, name) for name in getattr(_module, "FIXTURES", ())})
