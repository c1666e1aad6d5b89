"""Every config field does something: some code in sae_vision/ or run.py reads it.

An AST scan collects every attribute name read (`cfg.curves.max_fdr`) and every string constant
(`to_plain(cfg.data)["root"]`, `getattr(cfg, "seed")`) in the package, leaving out config.py's
validation (a field that is only validated still does nothing). A field whose name appears
nowhere fails the test; READ_ELSEWHERE lists, with the reason, the few read in other ways.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from sae_vision.core.config import Config

REPO = Path(__file__).resolve().parents[2]
# field -> why it counts as read although its name never appears as an attribute or string
READ_ELSEWHERE: dict[str, str] = {}
# Functions of config.py that only validate: reading a field there does not make it do anything.
VALIDATION_ONLY = {"check_config", "check_layer", "_one_of", "_positive"}


def _schema_fields(schema: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out += _schema_fields(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _names_read(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def _code_names() -> set[str]:
    names: set[str] = set()
    for path in [*sorted((REPO / "sae_vision").rglob("*.py")), REPO / "run.py"]:
        tree = ast.parse(path.read_text(), filename=str(path))
        if path.name == "config.py":  # only its helpers that compute from the config
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name not in VALIDATION_ONLY:
                    names |= _names_read(node)
        else:
            names |= _names_read(tree)
    return names


def test_every_config_field_is_read_by_some_code():
    names = _code_names()
    unread = [key for key in _schema_fields(Config)
              if key.rsplit(".", 1)[-1] not in names and key not in READ_ELSEWHERE]
    assert not unread, f"config fields that no code reads (remove them or use them): {unread}"


def test_the_scan_would_catch_an_unread_field():
    assert "surely_no_code_reads_this_field" not in _code_names()
    assert {"max_fdr", "n_null_seeds", "lr"} <= _code_names()
