"""Packaging: passes/, codegen/ and runtime/ live at the repo top level but install only as
cscompile.passes / cscompile.codegen / cscompile.runtime, and nothing else lands in site-packages."""
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cscompile

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"passes": "cscompile.passes", "codegen": "cscompile.codegen", "runtime": "cscompile.runtime"}
# What a wheel build needs from the checkout; everything else (.venv, .git, caches) stays behind.
BUILD_IGNORE = shutil.ignore_patterns(
    ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results", "bundle*"
)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_mapped_packages_import_from_the_top_level_folders():
    for folder, module_name in MAPPED.items():
        spec = importlib.util.find_spec(module_name)
        assert spec is not None, f"{module_name} is not importable: is the package installed (make setup)?"
        assert Path(spec.origin).resolve() == REPO / folder / "__init__.py"
    assert Path(cscompile.__file__).resolve() == REPO / "cscompile" / "__init__.py"


def test_no_top_level_passes_codegen_runtime_outside_the_repo(tmp_path):
    code = (
        "import importlib.util, json\n"
        f"names = {sorted(MAPPED)!r} + {sorted(MAPPED.values())!r}\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))\n"
    )
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = __import__("json").loads(result.stdout)
    assert found == {**{name: False for name in MAPPED}, **{name: True for name in MAPPED.values()}}


def test_wheel_holds_only_cscompile_and_its_dist_info(tmp_path):
    source, wheel_dir = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(REPO, source, ignore=BUILD_IGNORE)  # build out of tree: no build/ in the checkout
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
               "--no-index", "-q", "-w", str(wheel_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"wheel build failed (offline):\n{result.stdout}\n{result.stderr}"

    (wheel,) = wheel_dir.glob("cscompile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"cscompile", f"cscompile-{cscompile.__version__}.dist-info"}, top_level
    for module_name in MAPPED.values():
        assert f"{module_name.replace('.', '/')}/__init__.py" in names
    assert "cscompile/models.py" in names and "cscompile/errors.py" in names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    entry_points = zipfile.ZipFile(wheel).read(f"cscompile-{cscompile.__version__}.dist-info/entry_points.txt")
    assert b"cscompile = cscompile.cli:main" in entry_points


def test_console_script_reports_the_version(tmp_path):
    if importlib.util.find_spec("cscompile.cli") is None:
        pytest.skip("cscompile.cli does not exist yet")
    script = Path(sys.executable).parent / "cscompile"
    assert script.is_file(), f"no console script at {script}: reinstall with make setup"
    result = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert cscompile.__version__ in result.stdout and "cscompile" in result.stdout
