"""The README's quick-start code runs as written."""
import re
from pathlib import Path


def test_readme_quick_start_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python code block"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
