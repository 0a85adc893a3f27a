"""The verdict of `ufcram check` for each permission and feature situation."""
import pytest

from ufcram.tools.check import _verdict
from ufcram.app.uffd import FEATURES

pytestmark = pytest.mark.timeout(10)
ALL = sum(FEATURES.values())


def test_no_permission_says_which_grants_exist():
    v = _verdict("none", 0)
    assert not v["works"] and "/dev/userfaultfd" in v["verdict"]


def test_no_write_protect_is_fatal():
    v = _verdict("root", ALL & ~FEATURES["WP"])
    assert not v["works"] and "write-protect" in v["verdict"]


def test_user_mode_only_works_with_its_caveat():
    v = _verdict("UFFD_USER_MODE_ONLY only", ALL)
    assert v["works"] and "EFAULT" in v["verdict"]


def test_missing_optional_features_are_named():
    v = _verdict("root", ALL & ~FEATURES["MOVE"])
    assert v["works"] and "MOVE" in v["verdict"]
    assert "Missing" not in _verdict("root", ALL)["verdict"]
