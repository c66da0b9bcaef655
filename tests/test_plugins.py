"""A real third-party plugin: the distribution in tests/plugin_dist/ (fusion-plugin-example 0.3.1)
is pip-installed into a throw-away folder and the `fusion` CLI is run against it in subprocesses.

The install never touches the environment that runs the tests: pip installs with ``--target``
into a temporary folder, which the subprocesses get on PYTHONPATH, so ``importlib.metadata``
finds the distribution and its ``fusion`` entry points exactly as it would in site-packages.
Everything is offline (``--no-index --no-deps --no-build-isolation``).

Where the running interpreter cannot build a wheel from source (setuptools missing, or older
than 70.1 without the ``wheel`` package, as in a fresh ``python3.11 -m venv``), the fixture
assembles the same wheel by hand from pyproject.toml and pip-installs that instead.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

import fusion

DIST_SRC = Path(__file__).parent / "plugin_dist"
DIST_NAME = "fusion-plugin-example"
DIST_VERSION = "0.3.1"

pytestmark = pytest.mark.slow


# --- installing the distribution -------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def _can_build_from_source() -> bool:
    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    if importlib.util.find_spec("setuptools") is None:
        return False
    return _version_tuple(version) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def _build_wheel_by_hand(src: Path, dest: Path) -> Path:
    """A py3-none-any wheel of ``src`` from its pyproject.toml: the same files setuptools writes."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    stem = f"{name.replace('-', '_')}-{version}"
    files: dict[str, bytes] = {}
    for path in sorted((src / "src").rglob("*.py")):
        files[path.relative_to(src / "src").as_posix()] = path.read_bytes()
    info = f"{stem}.dist-info"
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        f"Summary: {project.get('description', '')}\nRequires-Python: {project.get('requires-python', '')}\n"
    ).encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: fusion-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    groups = project.get("entry-points", {})
    files[f"{info}/entry_points.txt"] = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()
    ).encode()
    record = [_record_line(arc, data) for arc, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
    return wheel


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder holding the pip-installed fusion-plugin-example (and nothing else)."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this interpreter")
    work = tmp_path_factory.mktemp("plugin-install")
    src = work / "src-copy"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(DIST_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    target = str(src) if _can_build_from_source() else str(_build_wheel_by_hand(src, work))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), target]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (site / f"fusion_plugin_example-{DIST_VERSION}.dist-info" / "entry_points.txt").is_file()
    return site


@dataclass
class Result:
    code: int
    out: str
    err: str


def _env(site: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_LOAD_PLUGINS", "FUSION_DEBUG")}
    paths = [str(site)] if site else []
    try:
        metadata.distribution("fusion")
    except metadata.PackageNotFoundError:  # fusion runs from a source tree: let the child find it too
        paths.append(str(Path(fusion.__file__).resolve().parent.parent))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


def fusion_cli(*argv, site: Path | None, cwd: Path, **env: str) -> Result:
    proc = subprocess.run([sys.executable, "-m", "fusion", *map(str, argv)], cwd=cwd, env=_env(site, **env),
                          capture_output=True, text=True, encoding="utf-8", timeout=180)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def plugins_json(site: Path | None, cwd: Path, *pre: str, **env: str) -> dict[str, dict]:
    res = fusion_cli(*pre, "plugins", "--json", site=site, cwd=cwd, **env)
    assert res.code == 0, res
    assert "Traceback" not in res.out + res.err
    return {p["name"]: p for p in json.loads(res.out)}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base/, chat/, code/ (tiny bf16 Qwen2) built with fusion.demo.make_family."""
    pytest.importorskip("torch")
    from fusion.demo import make_family

    root = tmp_path_factory.mktemp("family")
    return root, make_family(root)


# --- the install itself ----------------------------------------------------------------------


def test_install_did_not_touch_the_running_environment(plugin_site):
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution(DIST_NAME)
    assert importlib.util.find_spec("fusion_plugin_example") is None
    assert not any(ep.name in ("example", "broken") for ep in metadata.entry_points(group="fusion")
                   if ep.dist is not None and ep.dist.name == DIST_NAME)
    assert not (DIST_SRC / "build").exists() and not list(DIST_SRC.rglob("*.egg-info"))


# --- fusion plugins --------------------------------------------------------------------------


def test_plugins_text_lists_the_installed_plugin(plugin_site, tmp_path):
    res = fusion_cli("plugins", site=plugin_site, cwd=tmp_path)
    assert res.code == 0, res
    assert "Traceback" not in res.out + res.err
    lines = res.out.splitlines()
    example = next(i for i, line in enumerate(lines) if line.startswith("example "))
    assert DIST_NAME in lines[example] and DIST_VERSION in lines[example] and "installed" in lines[example]
    end = next((i for i in range(example + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    block = "\n".join(lines[example:end])
    assert "strategy scaled_average: The weighted average of the models, scaled" in block
    assert "https://example.org/scaled-average" in block
    assert re.search(r"weight \(float, per model, default 1\.0 in \(0, 10\]\)", block), block
    assert re.search(r"scale \(float, global, default 1\.0 in \[-2, 2\]\)", block), block
    # the broken entry point is reported with its error, and the built-ins are all still there
    broken = next(i for i, line in enumerate(lines) if line.startswith("broken "))
    assert DIST_NAME in lines[broken]
    assert lines[broken + 1].strip().startswith("ERROR: ImportError:")
    assert "nonexistent-dependency" in lines[broken + 1]
    assert "strategy linear:" in res.out and "strategy task_arithmetic:" in res.out


def test_plugins_json_describes_the_plugin_and_its_parameters(plugin_site, tmp_path):
    infos = plugins_json(plugin_site, tmp_path)
    example = infos["example"]
    assert example["distribution"] == DIST_NAME
    assert example["version"] == DIST_VERSION
    assert example["origin"] == "installed"
    assert example["error"] is None
    assert example["hooks"] == ["register_strategies"]
    (strategy,) = example["strategies"]
    assert strategy["name"] == "scaled_average"
    assert strategy["paper"] == "https://example.org/scaled-average"
    assert strategy["base_model"] == "unused"
    assert strategy["parameters"] == [
        {"name": "weight", "type": "number", "default": 1.0, "scope": "per-model", "range": "(0, 10]",
         "help": "wᵢ, the model's weight", "required": False},
        {"name": "scale", "type": "number", "default": 1.0, "scope": "global", "range": "[-2, 2]",
         "help": "multiplies the average", "required": False},
    ]
    broken = infos["broken"]
    assert broken["distribution"] == DIST_NAME and broken["version"] == DIST_VERSION
    assert broken["origin"] == "installed"
    assert broken["error"].startswith("ImportError:") and "nonexistent-dependency" in broken["error"]
    assert broken["strategies"] == [] and broken["hooks"] == []
    for builtin in ("linear", "task_arithmetic"):
        assert infos[builtin]["error"] is None and infos[builtin]["distribution"] == "model-fusion"


# --- merging with the installed strategy -----------------------------------------------------


def _scaled_average_config(folder: Path, root: Path, chat_weight="3", scale="0.5") -> Path:
    cfg = folder / "merge.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        merge_method: scaled_average
        models:
          - model: {root / 'chat'}
            parameters: {{weight: {chat_weight}}}
          - model: {root / 'code'}
        parameters: {{scale: {scale}}}
        """))
    return cfg


def test_merge_with_the_installed_strategy(plugin_site, family, tmp_path):
    import torch
    from safetensors.torch import load_file

    root, tensors = family
    cfg = _scaled_average_config(tmp_path, root)
    out = tmp_path / "merged"
    res = fusion_cli("merge", cfg, "-o", out, "-q", site=plugin_site, cwd=tmp_path)
    # the broken plugin is installed and loaded too: it must not get in the way
    assert res.code == 0, res
    assert "Traceback" not in res.out + res.err
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(tensors["base"])
    for name, got in merged.items():
        chat, code = tensors["chat"][name].float(), tensors["code"][name].float()
        expected = (0.5 * ((3.0 * chat + 1.0 * code) / 4.0)).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, expected), name
    provenance = json.loads((out / "fusion.json").read_text())
    assert provenance["merge_method"] == "scaled_average"


def test_out_of_range_plugin_parameter_names_the_config_path(plugin_site, family, tmp_path):
    root, _ = family
    outs = tmp_path / "outs"
    outs.mkdir()
    for weight, scale, where, rng in (("0", "0.5", "models[0].parameters.weight (line 4)", "(0, 10]"),
                                      ("3", "2.5", "parameters.scale (line 6)", "[-2, 2]")):
        cfg = _scaled_average_config(tmp_path, root, chat_weight=weight, scale=scale)
        res = fusion_cli("merge", cfg, "-o", outs / "merged", site=plugin_site, cwd=tmp_path)
        assert res.code == 1, res
        assert "Traceback" not in res.out + res.err
        lines = res.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.err
        assert where in lines[0] and "out of range" in lines[0] and rng in lines[0], lines[0]
        assert list(outs.iterdir()) == []


# --- choosing plugins: FUSION_LOAD_PLUGINS ---------------------------------------------------


@pytest.mark.parametrize("value, loaded", [
    ("", set()),
    ("example", {"example"}),
    ("broken", {"broken"}),
    (f" example , {DIST_NAME}", {"example", "broken"}),  # by entry-point name or distribution name
    ("something-else", set()),
], ids=["empty", "example", "broken", "by-distribution", "unknown"])
def test_fusion_load_plugins(plugin_site, tmp_path, value, loaded):
    infos = plugins_json(plugin_site, tmp_path, FUSION_LOAD_PLUGINS=value)
    assert {n for n, i in infos.items() if i["origin"] == "installed"} == loaded
    assert {"linear", "task_arithmetic"} <= set(infos)  # built-ins are always there
    assert all(infos[n]["error"] is None for n in infos if n != "broken")


def test_without_third_party_plugins_the_strategy_is_unknown(plugin_site, family, tmp_path):
    root, _ = family
    cfg = _scaled_average_config(tmp_path, root)
    res = fusion_cli("merge", cfg, "-o", tmp_path / "merged", site=plugin_site, cwd=tmp_path,
                     FUSION_LOAD_PLUGINS="")
    assert res.code == 1, res
    assert res.err.startswith("error: merge_method (line 1): unknown merge method 'scaled_average'")
    assert "linear" in res.err and "task_arithmetic" in res.err
    assert not (tmp_path / "merged").exists()


# --- a local single-file plugin --------------------------------------------------------------

NEGATE_DELTA = '''\
"""negate_delta: subtract the weighted task vectors, θ₀ − λ·Σ wᵢ(θᵢ − θ₀) (a local test plugin)."""
import fusion


class NegateDelta(fusion.Strategy):
    name = "negate_delta"
    description = "Base minus the weighted task vectors."
    base = "required"
    parameters = (
        fusion.Param("weight", float, 1.0, per_model=True),
        fusion.Param("lambda", float, 1.0, minimum=0, maximum=1),
    )

    def merge(self, base, tensors, params, context):
        delta = sum(w * (t - base) for w, t in zip(params["weight"], tensors))
        return base - params["lambda"] * delta


@fusion.hookimpl
def register_strategies(register):
    register(NegateDelta())
'''


def test_local_single_file_plugin(family, tmp_path):
    import torch
    from safetensors.torch import load_file

    root, tensors = family
    plugin = tmp_path / "my_negate.py"
    plugin.write_text(NEGATE_DELTA)
    infos = plugins_json(None, tmp_path, "--plugin", plugin)
    info = infos["my_negate"]
    assert info["origin"] == "local" and info["error"] is None
    assert [s["name"] for s in info["strategies"]] == ["negate_delta"]
    assert info["strategies"][0]["parameters"][1]["range"] == "[0, 1]"

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        merge_method: negate_delta
        base_model: {root / 'base'}
        models:
          - model: {root / 'chat'}
            parameters: {{weight: 0.5}}
          - model: {root / 'code'}
        parameters: {{lambda: 0.25}}
        out_dtype: float32
        """))
    out = tmp_path / "merged"
    res = fusion_cli("--plugin", plugin, "merge", cfg, "-o", out, "-q", site=None, cwd=tmp_path)
    assert res.code == 0, res
    merged = load_file(str(out / "model.safetensors"))
    for name, got in merged.items():
        b = tensors["base"][name].float()
        delta = 0.5 * (tensors["chat"][name].float() - b) + 1.0 * (tensors["code"][name].float() - b)
        assert got.dtype == torch.float32
        assert torch.equal(got, b - 0.25 * delta), name


def test_local_plugin_named_like_a_builtin_is_not_dropped(family, tmp_path):
    root, _ = family
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    plugin = folder / "linear.py"
    plugin.write_text(NEGATE_DELTA)
    infos = plugins_json(None, tmp_path, "--plugin", plugin)
    assert any("negate_delta" in [s["name"] for s in i["strategies"]] for i in infos.values()), infos
