"""Integration tests run on the real kernel: every test here needs userfaultfd."""
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.uffd)
