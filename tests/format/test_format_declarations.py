"""Spec facts live in vhdx/format and guard themselves: a wrong layout size fails at import, even under -O."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vhdx.format import layouts

FORMAT_DIR = Path(layouts.__file__).parent


def test_layout_size_check_raises_import_error_on_a_wrong_size():
    with pytest.raises(ImportError, match="the spec gives 64"):
        layouts._require_size("Header", 60, 64)


@pytest.mark.parametrize("module", sorted(p.name for p in FORMAT_DIR.glob("*.py")))
def test_format_module_has_no_assert_that_python_O_would_drop(module):
    tree = ast.parse((FORMAT_DIR / module).read_text())
    asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert not asserts, f"{module}: assert at lines {asserts}"


def test_format_declarations_import_under_python_O():
    code = "import vhdx.format.layouts, vhdx.format.partition_table, vhdx.format.constants"
    subprocess.run([sys.executable, "-O", "-c", code], check=True)
