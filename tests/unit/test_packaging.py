"""The distribution: one top-level import name, ``gpufleet``, however it is installed; no cycles between modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_gpufleet_and_nothing_else(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("gpufleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"gpufleet"}
    for module in (
        "gpu/plan/selection.py",
        "tasks/client.py",
        "workers/parent/batching.py",
        "workers/child/pipeline.py",
    ):
        assert f"gpufleet/{module}" in names, f"{module} is missing from the wheel"
    assert {"gpufleet/py.typed", "gpufleet/tasks/api/static/dashboard.html"} <= set(names)
    (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["gpufleet"]
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "gpufleet = gpufleet.workers.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_has_one_import_name() -> None:
    """The editable install (what the test command uses) resolves gpufleet, and no top-level gpu/tasks/workers."""
    probe = (
        "import importlib.util, json, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
        "names = ('gpufleet', 'gpu', 'tasks', 'workers'); "
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"gpufleet": true, "gpu": false, "tasks": false, "workers": false}'


def test_no_module_imports_itself_in_a_circle() -> None:
    """Record types live in modules of their own, so no two gpufleet modules import each other, even lazily."""
    graph = grimp.build_graph("gpufleet")
    circles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.chain_exists(importer=imported, imported=module)
        }
    )
    assert circles == []
