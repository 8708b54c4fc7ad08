"""Print the README's "## Two commands", one per line: the fenced ``bash`` blocks of that section.

``.ci/run`` runs exactly these lines, so CI proves the README's commands work on a clean clone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def readme_commands(text: str, heading: str = "## Two commands") -> list[str]:
    """Every line of every fenced ``bash`` block between ``heading`` and the next ``## `` heading."""
    start = text.index(heading + "\n") + len(heading) + 1
    end = text.find("\n## ", start)
    section = text[start:] if end < 0 else text[start:end]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


if __name__ == "__main__":
    commands = readme_commands(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text(encoding="utf-8"))
    if len(commands) != 2:
        sys.exit(f"readme_commands: expected the two commands under '## Two commands', found {len(commands)}")
    print("\n".join(commands))
