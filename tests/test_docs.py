"""The spec reference documents every field of the spec, and the README the two commands."""

from __future__ import annotations

import re

from pydantic import BaseModel

from conftest import ROOT
from disttrain import spec as spec_module


def _fields(model: type[BaseModel], seen: set[str]) -> None:
    for name, info in model.model_fields.items():
        seen.add(name)
        for kind in getattr(info.annotation, "__args__", ()) + (info.annotation,):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                _fields(kind, seen)


def test_every_spec_field_is_documented():
    names: set[str] = set()
    _fields(spec_module.JobSpec, names)
    text = (ROOT / "docs" / "spec.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", text))
    missing = sorted(names - documented)
    assert not missing, f"docs/spec.md lacks {missing}"


def test_readme_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
