"""The "adding a method" guide is executable: its Python blocks run in order, in a fresh process
(they register a component and a row, which must not leak into the other tests)."""

import re
import subprocess
import sys
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "adding_a_method.md"


def test_the_guide_runs_end_to_end(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 5
    script = tmp_path / "guide.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + "\n".join(blocks) + "\nprint('guide ok')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "guide ok" in run.stdout
