"""The docs take what they document from the code, written once there: each Lua script's contract
from the script itself (the Lua page includes every script, each by the line range of its whole
header, from its first line to the closing ``]]``), and the configuration reference from the
models' field descriptions (every field has one, and the docs name each model by the path users
import it from)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

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


# -- the configuration reference: written once, in the models' field descriptions --------------

DOCS = ROOT / "docs"
CONFIG_MODELS = (
    "strands_dedup.DedupConfig",
    "strands_dedup.SessionConfig",
    "strands_dedup.http.HttpConfig",
    "strands_dedup.http.GatewayConfig",
    "strands_dedup.http.OutgoingConfig",
)


def _model(path: str) -> type[BaseModel]:
    module, name = path.rsplit(".", 1)
    imported = importlib.import_module(module)
    assert name in imported.__all__, f"{path} is not a public name"
    model: type[BaseModel] = getattr(imported, name)
    return model


def _undescribed(model: type[BaseModel]) -> list[str]:
    return [
        name for name, field in model.model_fields.items() if not (field.description or "").strip()
    ]


@pytest.mark.parametrize("path", CONFIG_MODELS)
def test_every_field_of_a_configuration_model_has_a_description(path: str) -> None:
    assert _undescribed(_model(path)) == [], f"{path}: fields without a description"


def test_a_field_without_a_description_is_found() -> None:
    class Bare(BaseModel):
        described: int = Field(1, description="Has one.")
        bare: int = 2
        blank: int = Field(3, description="  ")

    assert _undescribed(Bare) == ["bare", "blank"]


def _directives(page: Path) -> list[str]:
    return re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.MULTILINE)


def test_the_configuration_pages_name_the_models_by_their_public_paths() -> None:
    # the modules that define them are internal and may be renamed; the docs name what users import
    for page in ("reference/config.md", "operations/configuration.md"):
        assert _directives(DOCS / page) == list(CONFIG_MODELS), page
    names = {path.rsplit(".", 1)[1]: path for path in CONFIG_MODELS}
    for page in DOCS.rglob("*.md"):
        for target in _directives(page):
            name = target.rsplit(".", 1)[-1]
            assert target == names.get(name, target), f"{page.name}: {target}"


@pytest.mark.timeout(60)
def test_the_docs_take_each_description_from_the_code_as_it_is() -> None:
    # the reference is read from the source (griffe, no import): a description it cannot read
    # as a plain string would be missing from the docs while the model still has it
    griffe = pytest.importorskip("griffe")
    extension = pytest.importorskip("griffe_pydantic").PydanticExtension()
    loader = griffe.GriffeLoader(extensions=griffe.Extensions(extension), search_paths=[ROOT])
    package = loader.load("strands_dedup")
    loader.resolve_aliases(implicit=False, external=False)
    for path in CONFIG_MODELS:
        model = _model(path)
        fields = package[path.removeprefix("strands_dedup.")].extra["griffe_pydantic"]["fields"]()
        assert set(fields) == set(model.model_fields), path
        for name, field in model.model_fields.items():
            shown = fields[name].docstring
            assert shown is not None and shown.value == field.description, f"{path}.{name}"
