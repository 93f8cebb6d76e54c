"""The install layout: every package folder is installed, and only under the `diet_engine` namespace."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("engine", "kernels", "storage", "launch")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_under_the_namespace():
    found = {"diet_engine." + ".".join(p.parent.relative_to(ROOT).parts)
             for top in FOLDERS for p in (ROOT / top).rglob("__init__.py")}
    assert set(_setuptools()["packages"]) == found


def test_no_generic_top_level_name_is_installed():
    st = _setuptools()
    assert all(p.startswith("diet_engine.") for p in st["packages"])
    assert st["package-dir"] == {f"diet_engine.{f}": f for f in FOLDERS}


def test_modules_import_under_the_namespace():
    import diet_engine.engine.trainer as trainer
    import diet_engine.launch.cli as cli

    assert Path(trainer.__file__).resolve() == ROOT / "engine" / "trainer.py"
    assert callable(cli.main)
