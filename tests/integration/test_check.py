"""`ufcram check` on the real kernel, as root and as an unprivileged user."""
import json
import os
import subprocess
import sys

import pytest

from ufcram.tools.check import report

pytestmark = pytest.mark.timeout(60)


def test_check_lists_write_protect_and_says_it_works():
    r = report()
    assert r["works"] and "WP" in r["features"]
    out = subprocess.run([sys.executable, "-m", "ufcram", "check"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "ufcram will work here" in out.stdout
    assert "WP " in out.stdout


def test_check_json_is_the_report():
    out = subprocess.run([sys.executable, "-m", "ufcram", "check", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["features_mask"] == report()["features_mask"]


def _as_nobody(fn):
    """Run fn() in a forked child that dropped root to nobody; return what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _nobody_view():
    from ufcram.errors import UffdPermissionError
    from ufcram.app.uffd import Uffd
    r = report()
    try:
        Uffd.open(user_mode_only=False).close()
        r["open"] = "ok"
    except UffdPermissionError as e:
        r["open"] = str(e)
    r["dev_access"] = os.access("/dev/userfaultfd", os.R_OK | os.W_OK)
    return r


@pytest.mark.root
def test_check_as_unprivileged_user_names_the_grant_that_applies():
    """Needs root to switch to the unprivileged user `nobody`."""
    r = _as_nobody(_nobody_view)
    if r["unprivileged_userfaultfd"] == 1:
        assert r["permission"] == "userfaultfd(2) allowed" and r["works"]
    elif r["dev_access"]:
        assert r["permission"] == "/dev/userfaultfd access" and r["works"]
    else:
        assert r["permission"] == "UFFD_USER_MODE_ONLY only"
        assert "UFCRAM_USER_MODE_ONLY=1" in r["verdict"] and "EFAULT" in r["verdict"]
        assert "vm.unprivileged_userfaultfd=1" in r["open"]   # a clear error on open
