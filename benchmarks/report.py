"""Writes one benchmark's section of BENCHMARKS.md, leaving the other sections as they are."""
from __future__ import annotations

import os
import re

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
TITLE = "# Benchmarks\n\nEach section is written by the benchmark named in it; numbers are from the run it records.\n"


def write_section(name: str, body: str, path: str = PATH) -> None:
    """Replaces (or appends) the section headed `## name` with `body`; written atomically."""
    text = open(path).read() if os.path.exists(path) else TITLE
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text.rstrip() + "\n")
    os.replace(tmp, path)
