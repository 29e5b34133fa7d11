"""Every detached actor is made by `config/actors.py::detached_actor`, and every Ray namespace a
call names is `config.names.ACTOR_NAMESPACE`, never a literal (DESIGN.md: one helper, one namespace)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "config" / "actors.py"
SKIP = {".venv", ".git", "node_modules"}


def python_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts))


def offending_calls(path: Path, root: Path = ROOT) -> list[str]:
    """`f(..., lifetime="detached")` outside the helper, and `f(..., namespace="<literal>")` anywhere."""
    bad, where = [], path.relative_to(root)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            literal = isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)
            if kw.arg == "lifetime" and literal and kw.value.value == "detached" and path != HELPER:
                bad.append(f"{where}:{node.lineno} makes a detached actor without detached_actor()")
            elif kw.arg == "namespace" and literal:
                bad.append(f"{where}:{node.lineno} names the namespace {kw.value.value!r} literally")
    return bad


def test_detached_actors_come_from_the_one_helper_in_the_one_namespace():
    assert [b for p in python_files() for b in offending_calls(p)] == []


def test_the_scan_sees_both_mistakes(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f(A):\n    ray.init(namespace='orfeas')\n"
                 "    return A.options(name='x', lifetime='detached').remote()\n")
    assert offending_calls(f, tmp_path) == [
        "m.py:2 names the namespace 'orfeas' literally",
        "m.py:3 makes a detached actor without detached_actor()",
    ]
