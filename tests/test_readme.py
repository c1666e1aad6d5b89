"""The README's Python API example runs as written (issue 22): its code block, unchanged, on a
small real tensor saved where the example loads it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def python_api_example() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs_unchanged(tmp_path):
    code = python_api_example()
    assert "from sae_vision.sae import" in code  # the example goes through the package surfaces
    torch.manual_seed(0)
    torch.save(torch.relu(torch.randn(512, 16)), tmp_path / "acts.pt")
    # The example trains for 2,000 steps; a smaller n_steps keeps the test quick. Nothing else
    # in the block is touched.
    assert code.count("n_steps=2000") == 1
    script = code.replace("n_steps=2000", "n_steps=20")
    (tmp_path / "example.py").write_text(script)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "my_run" / "sae.safetensors").is_file()
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.strip()]
    assert lines and all(len(ln) == 3 for ln in lines)  # step, fvu, l0 from the log callback
