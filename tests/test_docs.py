"""The documented surface matches the code."""

from pathlib import Path

from fusion.api import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def test_every_hook_is_documented():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [n for n in dir(hookspecs) if not n.startswith("_") and callable(getattr(hookspecs, n))
             and hasattr(getattr(hookspecs, n), "fusion_spec")]
    assert hooks, "no hook specs found"
    for hook in hooks:
        assert f"### `{hook}(" in doc, f"hook {hook} is not documented in docs/plugins.md"


def test_every_builtin_strategy_is_documented():
    from fusion.host import strategies

    doc = (ROOT / "docs" / "strategies.md").read_text()
    for name in strategies():
        assert f"## {name}" in doc, f"strategy {name} is not documented in docs/strategies.md"


def test_readme_opens_with_the_two_commands():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("make ")]
    assert lines[:2] and lines[0].startswith("make demo") and lines[1].startswith("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
