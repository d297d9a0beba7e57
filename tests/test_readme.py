"""The README's two commands are what CI runs, and the packaging maps kernels/ under sparse_infer."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fenced_commands(text):
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = _fenced_commands(readme)
    test_cmd = next(c for c in commands if c.endswith("pytest"))
    assert test_cmd in ci.splitlines()
    # the first screen: the main job's command comes first, the tests' second
    assert commands[0].endswith("sparse-infer eval") and commands[1] == test_cmd
    assert readme.index(commands[1]) < 2500


def test_no_top_level_kernels_package():
    import importlib.metadata

    import sparse_infer.kernels as k

    # Editable or not, sparse_infer.kernels must be this checkout's kernels/ folder ...
    installed = Path(k.__file__).resolve().parent
    ours = sorted(f.name for f in (ROOT / "kernels").glob("*.py"))
    assert sorted(f.name for f in installed.glob("*.py")) == ours
    assert all((installed / f).read_bytes() == (ROOT / "kernels" / f).read_bytes() for f in ours)
    # ... and the installed distribution declares no top-level package but sparse_infer.
    top = importlib.metadata.distribution("sparse-infer").read_text("top_level.txt")
    assert top is not None and top.split() == ["sparse_infer"]
    toml = (ROOT / "pyproject.toml").read_text()
    assert '"sparse_infer.kernels" = "kernels"' in toml and 'packages = ["sparse_infer", "sparse_infer.kernels"]' in toml
