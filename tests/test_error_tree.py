"""The error tree in the errors module's docstring is the one place it is written (the docs
render it): it must name every error class the module defines, under its real parent, and
nothing else."""

from __future__ import annotations

import inspect
import re
import sys

import pytest

import strands_dedup
from strands_dedup import DedupError

errors = sys.modules[DedupError.__module__]

pytestmark = pytest.mark.timeout(10)


def _drawn() -> dict[str, str]:
    """Each class drawn in the tree -> the class drawn as its parent."""
    doc = errors.__doc__ or ""
    lines = doc.split("::", 1)[1].split("\n\n", 2)[1].splitlines()
    root = lines[0].strip()
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = [(-1, root)]
    for line in lines[1:]:
        found = re.match(r"^([ │]*)[├└]── (\w+)", line)
        if found is None:
            continue  # a description's continuation
        depth = len(found.group(1)) // 4
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[found.group(2)] = stack[-1][1]
        stack.append((depth, found.group(2)))
    return {root: "", **parents}


def _defined() -> dict[str, str]:
    """Each exception class errors.py defines -> its parent among them."""
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls)
        and issubclass(cls, DedupError)
        and cls.__module__ == errors.__name__
    }
    return {
        name: next((b.__name__ for b in cls.__bases__ if b.__name__ in classes), "")
        for name, cls in classes.items()
    }


def test_the_drawn_tree_is_the_class_tree() -> None:
    assert _drawn() == _defined()


def test_every_error_is_exported() -> None:
    assert set(_defined()) <= set(strands_dedup.__all__)


def test_the_parser_sees_a_wrong_parent() -> None:
    drawn = _drawn()
    assert drawn["NotStored"] == "PrimaryFailed"
    assert drawn["StoreRefused"] == "StoreUnavailable"
    assert drawn["LeaseLost"] == "DedupError"
