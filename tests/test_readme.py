"""The README's API headings are the code's signatures: same parameters, same order, same
keyword-only split, same defaults."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import zeroload

README = Path(__file__).resolve().parent.parent / "README.md"
HEADINGS = re.findall(r"^### `zeroload\.(\w+)\((.*)\)`\s*$", README.read_text(), re.M)


def _documented(params: str) -> list[tuple[str, str, str | None]]:
    """(name, kind, default source) of a documented parameter list."""
    fn = ast.parse(f"def f({params}): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    out: list[tuple[str, str, str | None]] = []
    positional = a.posonlyargs + a.args
    pos_defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(positional, pos_defaults):
        out.append((arg.arg, "positional", ast.unparse(d) if d is not None else None))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "keyword", ast.unparse(d) if d is not None else None))
    if a.kwarg is not None:
        out.append((a.kwarg.arg, "**", None))
    return out


def _actual(fn: object) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    for p in inspect.signature(fn).parameters.values():  # type: ignore[arg-type]
        kind = "keyword" if p.kind is p.KEYWORD_ONLY else "positional"
        kind = "**" if p.kind is p.VAR_KEYWORD else kind
        default = None if p.default is p.empty else repr(p.default)
        out.append((p.name, kind, default))
    return out


def test_the_readme_documents_the_public_functions() -> None:
    assert {name for name, _ in HEADINGS} >= {"load", "open", "load_into", "track"}


@pytest.mark.parametrize("name,params", HEADINGS, ids=[n for n, _ in HEADINGS])
def test_readme_signature_matches_the_code(name: str, params: str) -> None:
    assert _documented(params) == _actual(getattr(zeroload, name))
