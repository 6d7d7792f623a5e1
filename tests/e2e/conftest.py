"""The end-to-end tier: every test here runs the product in subprocesses and is slow.
Each file marks its tests `slow`; this hook makes sure a new one is marked too, so
`-m "not slow"` never starts an end-to-end run."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
