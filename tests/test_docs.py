"""The docs take each Lua script's contract from the script itself: the Lua page includes every
script, each by the line range of its whole header (from its first line to the closing ``]]``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(10)
ROOT = Path(__file__).parents[1]
LUA = ROOT / "strands_dedup" / "_store" / "lua"
PAGE = ROOT / "docs" / "internals" / "lua.md"


def test_every_script_header_is_included_whole() -> None:
    included = {
        name: (int(first), int(last))
        for name, first, last in re.findall(
            r'--8<-- "strands_dedup/_store/lua/([\w.]+\.lua):(\d+):(\d+)"', PAGE.read_text()
        )
    }
    assert set(included) == {path.name for path in LUA.glob("*.lua")}
    for name, (first, last) in included.items():
        lines = (LUA / name).read_text().splitlines()
        assert first == 1 and lines[0].startswith("--[["), name
        end = next(i for i, line in enumerate(lines, 1) if line.rstrip().endswith("]]"))
        assert last == end, f"{name}: the page includes lines 1-{last}, its header ends at {end}"
