"""Run the README's commands the way it prints them, so a command that stops working fails CI.

    .venv/bin/python tests/readme_check.py        (or: make readme-check, after make demo)

Each code block right after a `<!-- readme-check -->` line runs from the repository root: a
bash block command by command (backslash continuations joined), a python block as one script
with the venv's python. Every command must exit 0; `<!-- readme-check: REGEX -->` also wants
the block's last line of output to match REGEX. litgpt's tests/test_readme.py is the model.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- readme-check(?:: (?P<expect>.*?))? -->\n```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def commands(code: str) -> list[str]:
    """The commands of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run(command: list[str]) -> str:
    t0 = time.perf_counter()
    # As a user types it, not as a sub-make of `make readme-check` (which would print
    # "make[1]: Leaving directory ..." after the command's own last line).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    shown = command[-1] if command[0] == "bash" else "python <README block>"
    print(f"  {time.perf_counter() - t0:5.0f}s  rc={proc.returncode}  {shown[:110]}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"readme-check: this README command failed:\n{shown}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
                 f"--- stderr ---\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    # No options: the parser is there so that --help explains instead of running every command.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    blocks = list(BLOCK.finditer((ROOT / "README.md").read_text()))
    if not blocks:
        sys.exit("readme-check: no <!-- readme-check --> blocks in README.md")
    # A bare `python` is whatever is on PATH (CI's has no torch): checked commands name the venv's,
    # and this is caught before the first block runs rather than half an hour into CI.
    bare = [c for b in blocks if b["lang"] == "bash" for c in commands(b["code"])
            if c.split()[0] in ("python", "python3", "torchrun", "pip")]
    if bare:
        sys.exit("readme-check: these README commands use a bare interpreter; write .venv/bin/...:\n"
                 + "\n".join(bare))
    for block in blocks:
        lang, code, expect = block["lang"], block["code"], block["expect"]
        if lang == "bash":
            outputs = [run(["bash", "-c", c]) for c in commands(code)]
        elif lang == "python":
            outputs = [run([sys.executable, "-c", code])]
        else:
            sys.exit(f"readme-check: cannot run a {lang!r} block")
        last = (outputs[-1].strip().splitlines() or [""])[-1]
        if expect and not re.search(expect, last):
            sys.exit(f"readme-check: the block printed {last!r}, which does not match {expect!r}:\n{code}")
    print(f"readme-check: {len(blocks)} README blocks ran as printed")


if __name__ == "__main__":
    main()
