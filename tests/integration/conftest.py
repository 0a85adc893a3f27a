"""Integration tests run on the real kernel: every test here needs userfaultfd. The C
programs they run are built here, once per session."""
import shutil
import subprocess
from pathlib import Path

import pytest

PROGS = Path(__file__).parent / "preload_progs"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.uffd)


@pytest.fixture(scope="session")
def gcc():
    """The C compiler's path; the test is skipped without one."""
    path = shutil.which("gcc")
    if path is None:
        pytest.skip("gcc is not installed: the C test programs cannot be built")
    return path


@pytest.fixture(scope="session")
def build(gcc, tmp_path_factory):
    """build(name) compiles preload_progs/name.c (a shared library with shared=True)."""
    out = tmp_path_factory.mktemp("preload_progs")

    def build(name, shared=False):
        target = out / (f"lib{name}.so" if shared else name)
        if not target.exists():
            done = subprocess.run(
                [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
                 *(["-shared", "-fPIC"] if shared else []), "-o", target, PROGS / f"{name}.c"],
                capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"gcc {name}.c failed:\n{done.stderr}"
        return target
    return build
