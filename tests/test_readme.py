"""The README's Python example runs as written (with the bundled demo model and image)."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(capsys, monkeypatch):
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(REPO)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "<__dj__image> a red circle <|__dj__eoc|>" in out
    assert out.count("'images'") == 1 + 3 + 1  # original + 3 candidates ('all') + the no-image sample
