"""`pip install .` as a user installs: the wheel, built from a copy of the sources (the CPU extension only), in a
fresh virtual environment, run from another folder: the shipped configs by name, `python -m amfor.train` and the
console commands work from the installed copy, not from the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from amfor.config import build_config, list_configs, to_yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("amfor-train", "amfor-test", "amfor-export", "amfor-extract", "amfor-visualize")


def copy_sources(dst: Path) -> None:
    """The files a fresh clone has (tracked, and new files not ignored): no build/, no compiled extension, no
    amfor/kernels link."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
        for name in filter(None, listed):
            if (ROOT / name).is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dst / name)
    else:  # an unpacked source archive
        skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs", "data", "*.so", "__pycache__",
                                      ".venv*")
        shutil.copytree(ROOT, dst, ignore=lambda d, names: [*skip(d, names), *(
            ["kernels"] if Path(d) == ROOT / "amfor" else [])])


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy, not the sources
    env.update(AMFOR_BUILD_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(wheel, venv bin folder, a working directory outside the sources)."""
    work = tmp_path_factory.mktemp("packaging")
    src, wheels, venv, elsewhere = work / "src", work / "wheels", work / "venv", work / "elsewhere"
    copy_sources(src)
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", wheels], work, 3600)
    (wheel,) = wheels.glob("amfor-*.whl")
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], work, 600)
    run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--ignore-installed", wheel], work, 600)
    return wheel, venv / "bin", elsewhere


def test_wheel_ships_the_configs_and_the_commands(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {f"amfor/configs/{name}.yaml" for name in list_configs()} <= names
    assert "amfor/kernels/__init__.py" in names and any(n.startswith("amfor/_C") for n in names)
    for command in COMMANDS:
        module = command.replace("-", ".")
        assert f"{command} = {module}:main" in entry_points


def test_installed_copy_trains_by_config_name(installed):
    _, bin_dir, elsewhere = installed
    where = run([bin_dir / "python", "-c", "import amfor; print(amfor.__file__)"], elsewhere, 300).stdout.strip()
    assert Path(where).is_relative_to(bin_dir.parent), where  # the venv's copy
    expected = to_yaml(build_config("market1501"))
    for command, name in (([bin_dir / "python", "-m", "amfor.train"], "market1501"),
                          ([bin_dir / "amfor-train"], "market1501"), ([bin_dir / "amfor-train"], "market1501.yaml")):
        assert run([*command, "--print-config", "--config", name], elsewhere, 600).stdout == expected, command
    for command in COMMANDS:
        assert f"usage: {command}" in run([bin_dir / command, "--help"], elsewhere, 600).stdout
