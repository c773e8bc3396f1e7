"""Test-suite settings: offline, deterministic, `@pytest.mark.slow` tests only with RUN_SLOW=1."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # `from common import ...`


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW", "0") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
