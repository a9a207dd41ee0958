"""The layers hold: the Beam-free stage cores (`stages.core`), the model code
(`stages.models`) and the whole `trainer` package import without Apache Beam.

Each check runs in a fresh interpreter, so a module this test process has
already imported (or one a previous test pulled in) cannot hide an import."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages.core", "stages.models", "trainer")


def modules_of(package: str) -> list[str]:
    """The package and every module below it, found on disk (not by importing)."""
    root = REPO.joinpath(*package.split("."))
    found = [package]
    for info in pkgutil.walk_packages([str(root)], prefix=f"{package}."):
        if not info.name.split(".")[-1].startswith("__"):
            found.append(info.name)
    return sorted(found)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_without_apache_beam(package):
    modules = modules_of(package)
    assert len(modules) > 1, f"{package} has no modules to check"
    code = (
        "import importlib, json, sys\n"
        f"modules = {modules!r}\n"
        "for name in modules:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'beam': sorted(m for m in sys.modules if m == 'apache_beam' or m.startswith('apache_beam.')), 'modules': modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["beam"] == [], f"importing {package} imported apache_beam ({result['beam'][:5]} ...)"


def test_the_check_sees_a_beam_import():
    """The probe itself works: a module that imports Beam is caught."""
    code = "import sys, stages.dedup; print('apache_beam' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.stdout.strip() == "True", done.stderr[-3000:]
