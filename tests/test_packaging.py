"""What `pip install` gets: the built-in plugins (plugins/) and the architecture data (registry/)
live at the top of the repository and install inside the package as fusion.plugins and
fusion.registry, in a wheel and in an editable install alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked(sub: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", sub], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_this_install_serves_plugins_and_registry_from_the_top_folders():
    """The tests run on an editable install: its fusion.plugins is plugins/, and every spec in
    registry/ is registered."""
    import fusion.plugins
    from fusion.host import architectures

    assert Path(fusion.plugins.__file__).resolve().parent == ROOT / "plugins"
    names = {s.name for s in architectures()}
    import yaml

    for path in (ROOT / "registry").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["name"] in names, path.name


@pytest.mark.slow
def test_wheel_carries_plugins_registry_and_kernels(tmp_path):
    """A wheel built from the tracked files alone installs a fusion that lists its built-ins."""
    src = tmp_path / "src"
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("model_fusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in _tracked("plugins"):
        if f.endswith(".py"):
            assert "fusion/" + f in names, f
    for f in _tracked("registry"):
        assert "fusion/" + f in names, f
    assert any(n.startswith("fusion/api/_kernels") for n in names), "the C extension is not in the wheel"
    assert not any(n.startswith("fusion/csrc") for n in names), "C sources shipped in the wheel"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", "import fusion; print(fusion.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(target))
    listing = subprocess.run([sys.executable, "-m", "fusion", "plugins"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "strategy ties:" in listing.stdout and "merge kernels: C (built" in listing.stdout
    archs = subprocess.run([sys.executable, "-m", "fusion", "architectures"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert "qwen2_vl" in archs.stdout and "llava" in archs.stdout, archs.stdout
