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


def test_checkout_root_on_sys_path_makes_no_second_copy_of_the_kernels():
    """From the checkout's root (``python -m pytest``, ``PYTHONPATH=.``) kernels/ is importable as a top-level
    ``kernels``, and transformers imports whatever ``kernels`` it finds to read its version.  That copy must
    stay empty: a second registration of the custom ops would send compiled calls to a copy with its own
    config overrides and fallback cutoffs (a settings change on sparse_infer.kernels then had no effect)."""
    import subprocess
    import sys

    code = (
        "import sys, sparse_infer.kernels as K, transformers.activations\n"
        "from sparse_infer.kernels import sparse_matmul as sm\n"
        "top = sys.modules.get('kernels')\n"
        "assert top is not None, 'transformers did not probe kernels: the test proves nothing'\n"
        "assert top.__all__ == [] and not hasattr(top, 'sparse_linear'), dir(top)\n"
        "assert not [m for m in sys.modules if m.startswith('kernels.')], sorted(sys.modules)\n"
        "import torch\n"
        "from sparse_infer.ops import Gate\n"
        "calls = []\n"
        "launch = sm._launch\n"
        "sm._launch = lambda *a, **kw: calls.append(kw['mode']) or launch(*a, **kw)\n"
        "x, w = torch.randn(1, 40), torch.randn(24, 40)\n"
        "torch.ops.sparse_infer.sparse_linear(x, w, None, 8, None, None, False, -1.0)\n"
        "assert calls, 'the custom op ran another copy of the kernels'\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
