"""The folder rules and the picture, checked against the code (scripts/import_graph.py reads the imports with ast)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
sys.modules["import_graph"] = import_graph
spec.loader.exec_module(import_graph)


def test_no_folder_imports_what_its_rule_forbids():
    assert import_graph.broken_rules() == []


def test_the_rules_catch_a_forbidden_import(tmp_path):
    """The check itself: a tpv module importing Ray (even inside a function) and a serve module importing a job."""
    for package in import_graph.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tpv" / "leak.py").write_text("def f():\n    import ray.tune\n")
    (tmp_path / "serve" / "leak.py").write_text("from tune_jobs.sweep import run_sweep\n")
    assert import_graph.broken_rules(tmp_path) == ["serve.leak imports tune_jobs.sweep",
                                                   "serve.leak imports tune_jobs.sweep.run_sweep",
                                                   "tpv.leak imports ray.tune"]


def test_no_module_level_import_circles():
    assert import_graph.circles(import_graph.graph(top_level_only=True)) == []


def test_circles_are_found_through_deferred_imports(tmp_path):
    (tmp_path / "tpv").mkdir()
    for package in ("tune_jobs", "serve"):
        (tmp_path / package).mkdir()
    (tmp_path / "tpv" / "a.py").write_text("import tpv.b\n")
    (tmp_path / "tpv" / "b.py").write_text("def f():\n    from tpv.a import x\n")
    (tmp_path / "tpv" / "c.py").write_text("import tpv.a\n")
    assert import_graph.circles(import_graph.graph(root=tmp_path)) == [["tpv.a", "tpv.b"]]
    assert import_graph.circles(import_graph.graph(top_level_only=True, root=tmp_path)) == []


def test_the_committed_picture_is_the_code_s():
    """docs/imports.svg is made from the imports (`python scripts/import_graph.py --svg docs/imports.svg`)."""
    assert (ROOT / "docs" / "imports.svg").read_text() == import_graph.svg(import_graph.graph(top_level_only=True))
