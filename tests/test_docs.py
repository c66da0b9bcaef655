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


def test_readme_python_example_merges(tmp_path, monkeypatch):
    """The README's Python example, run as written on tiny stand-ins of its three models."""
    import re

    from fusion.demo import make_family

    text = (ROOT / "README.md").read_text()
    block = text.split("### From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert "fusion.merge(" in code and "fusion.plan(" in code
    make_family(tmp_path)  # base/, chat/, code/
    monkeypatch.chdir(tmp_path)
    printed: list[str] = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(" ".join(map(str, a)))})
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert printed[-1].startswith("wrote merged: 27 tensors merged"), printed[-1]
    assert "method      ties" in printed[0]


def test_readme_strategy_examples_merge(tmp_path):
    """The README's example configs of the Strategies section merge as written on tiny stand-ins;
    the seeded one gives the same bytes twice."""
    import re

    import fusion
    from fusion.demo import make_family

    text = (ROOT / "README.md").read_text()
    section = text.split("### Strategies", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    make_family(tmp_path)  # base/, chat/, code/
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.yaml").write_text(block)
        for out in ("a", "b"):
            fusion.merge(tmp_path / f"{i}.yaml", tmp_path / f"{i}-{out}", card=False)
        a, b = ((tmp_path / f"{i}-{out}" / "model.safetensors").read_bytes() for out in ("a", "b"))
        assert a == b and len(a) > 0
