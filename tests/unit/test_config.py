"""Every UFCRAM_* tunable is in config.SETTINGS and on docs/configuration.md, and only those."""
import re
from pathlib import Path

import pytest

from ufcram import config
from ufcram.errors import UfcramError

pytestmark = pytest.mark.timeout(10)
ROOT = Path(__file__).resolve().parents[2]


def names_in(paths):
    found = set()
    for path in paths:
        # a setting is looked up by its name as a string literal (header guards are not)
        found |= set(re.findall(r"[\"'](UFCRAM_[A-Z_]+[A-Z])[\"'=]", path.read_text()))
    return found


def test_docs_list_exactly_the_settings():
    documented = set(re.findall(r"^\| `(UFCRAM_[A-Z_]+)`",
                                (ROOT / "docs/configuration.md").read_text(), re.M))
    assert documented == set(config.SETTINGS)


def test_code_uses_only_documented_settings():
    sources = [*(ROOT / "ufcram").rglob("*.py"), *(ROOT / "native").rglob("*.[ch]")]
    assert len(sources) > 40   # every folder of both trees, not just their tops
    assert names_in(sources) <= set(config.SETTINGS)


def test_values_parse_and_bad_values_are_clear(monkeypatch):
    monkeypatch.setenv("UFCRAM_STAGING_PAGES", "64")
    assert config.get("UFCRAM_STAGING_PAGES") == 64
    monkeypatch.setenv("UFCRAM_STAGING_PAGES", "lots")
    with pytest.raises(UfcramError, match="UFCRAM_STAGING_PAGES"):
        config.get("UFCRAM_STAGING_PAGES")
    monkeypatch.setenv("UFCRAM_STAGING_PAGES", "-1")
    with pytest.raises(UfcramError, match="negative"):
        config.get("UFCRAM_STAGING_PAGES")
    monkeypatch.delenv("UFCRAM_NODE_CAPACITY", raising=False)
    assert config.get("UFCRAM_NODE_CAPACITY") > 0
