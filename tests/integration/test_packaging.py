"""A plain (non-editable) `pip install .` makes `twistd mailappliance` discoverable."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_non_editable_install_ships_the_plugin(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "var", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
        "dropin.cache", "benchmarks"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # Dependencies come from the test environment (no network needed); the project itself is
    # built and installed for real, without editable hooks.
    new_site = Path(subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    parents = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]]
    (new_site / "_test_deps.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    r = subprocess.run([py, "-m", "pip", "install", "--no-deps",
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    plugin_dir = new_site / "twisted" / "plugins"
    assert (plugin_dir / "mailappliance_plugin.py").is_file(), "the plugin ships"
    assert not (plugin_dir / "__init__.py").exists(), "twisted/plugins stays a namespace"
    assert not (new_site / "twisted" / "__init__.py").exists()
    assert (new_site / "mailappliance" / "config.py").is_file()
    assert (venv / "bin" / "mailappliance").exists()
    assert (venv / "bin" / "mailappliance-sendmail").exists()
    # where conf/mailappliance.service's Documentation= points (PREFIX/share/doc/...)
    for page in ("OPERATIONS.md", "README.rst", "CONFIGURATION.md"):
        assert (venv / "share" / "doc" / "mailappliance" / page).is_file(), page

    # An unwritable dropin.cache must not break discovery: make it a directory, which no
    # process (root included) can overwrite with the cache file.
    for p in plugin_dir.glob("dropin.cache"):
        p.unlink()
    (plugin_dir / "dropin.cache").mkdir()
    twistd = [py, "-c", "import sys; from twisted.scripts.twistd import run; "
              "sys.argv[0] = 'twistd'; run()"]
    work = tmp_path / "empty"
    work.mkdir()
    r = subprocess.run([*twistd, "mailappliance", "--help"], cwd=work, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--smtp=" in r.stdout and "--config=" in r.stdout and "--hostname=" in r.stdout
    r = subprocess.run([*twistd, "--help"], cwd=work, capture_output=True, text=True, timeout=120)
    assert "mailappliance" in r.stdout
