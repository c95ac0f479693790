"""Writes one benchmark's section of BENCHMARKS.md, leaving the other sections as they are."""
from __future__ import annotations

import math
import os
import re

import jax

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


def program_flops(jitted, *args) -> float:
    """XLA's cost-analysis FLOPs of `jitted(*args)`, traced afresh with attention in one query block: XLA counts a
    loop body once, so the blocked attention's lax.map / scan would be under-counted (the arithmetic is the same).
    Clears jax's caches before and after, so later calls compile the blocked program again."""
    from jaxdiff.models import attention

    blocks, attention.BLOCK_LOGITS = attention.BLOCK_LOGITS, math.inf
    jax.clear_caches()
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    finally:
        attention.BLOCK_LOGITS = blocks
        jax.clear_caches()
    return (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
