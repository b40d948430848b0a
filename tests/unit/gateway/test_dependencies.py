"""The gateway faces clients with aiohttp's HTTP server: its floor is the release that fixes the
latest HTTP-parser and server advisories (request smuggling, header and trailer limits, the
server's header timeout; GHSA-2g87-pp6c-29x5 and GHSA-5wr8-gcqf-gqf3 fixed in 3.14.5)."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"
HARDENED = Version("3.14.5")


def _aiohttp() -> Requirement:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    (requirement,) = [
        Requirement(line) for line in project["dependencies"] if line.startswith("aiohttp")
    ]
    return requirement


def test_aiohttp_floor_has_the_parser_hardening() -> None:
    floors = [Version(s.version) for s in _aiohttp().specifier if s.operator == ">="]
    assert floors and min(floors) >= HARDENED


def test_the_installed_aiohttp_satisfies_the_floor() -> None:
    assert _aiohttp().specifier.contains(version("aiohttp"))
