"""The suite's own disk use. Test files keep their shared artifacts in `module_tmp` (tests/conftest.py), removed
when the file is done, or in `tmp_path`, removed when the test passes; only the shared fixture modules make
directories that live to the end of the run. Why: with every file's exports kept until the end, the suite peaked at
~12 GB of /tmp and a CI run on a smaller disk died of ENOSPC in its last test (measured after the change: ~4 GB)."""
from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).parent
SHARED = {"conftest.py", "model_fixtures.py", "deploy_fixtures.py"}   # session artifacts that several files read
LASTING = {"mktemp", "mkdtemp", "getbasetemp"}   # tmp_path_factory / tempfile calls whose directories outlive a file


def lasting_dirs(source: str) -> list[int]:
    """Lines of `source` that make a directory nothing removes before the run ends."""
    return sorted(node.lineno for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in LASTING)


def test_test_files_make_no_lasting_directories():
    found = {p.name: lines for p in sorted(HERE.glob("*.py")) if p.name not in SHARED
             and (lines := lasting_dirs(p.read_text(encoding="utf-8")))}
    assert not found, f"use module_tmp or tmp_path instead (lines per file): {found}"


def test_the_check_sees_both_kinds():
    src = ('import tempfile\n'
           'def f(tmp_path_factory):\n'
           '    a = tmp_path_factory.mktemp("x")\n'
           '    b = tempfile.mkdtemp()\n'
           '    with tempfile.TemporaryDirectory() as c:\n'
           '        pass\n')
    assert lasting_dirs(src) == [3, 4]
