"""Every code block of README.md and docs/*.md runs as written.

```python blocks: the blocks of one page run in order in one fresh namespace (a later block may use
the names an earlier one defined, as a reader would), in a temporary working directory, on CPU,
with lomo_kernels' own warnings turned into errors (an example that warns is a wrong example).
```bash blocks: each runs in bash from the repository root, with this interpreter first on PATH.
Other fences (json, yaml, text, none) are not run.

A block is not run only when the line before it says why and which test runs that path instead:

    <!-- example: not run (needs a GPU | several processes | long ...); covered by tests/test_x.py -->

and the named file exists (a marker naming a missing file fails). `<!-- example: slow -->` runs
the block, as a `slow` test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!-- example: (.*?) -->")
COVERED = re.compile(r"^not run \((.+)\); covered by (\S+)$")


class Block:
    def __init__(self, page: Path, line: int, lang: str, code: str, marker: str | None):
        self.page, self.line, self.lang, self.code, self.marker = page, line, lang, code, marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page}" \
               f":{self.line}"

    def skip_reason(self) -> str | None:
        """None when the block runs; the reason when a valid marker says it is covered elsewhere.
        A malformed marker, or one naming a file that does not exist, raises."""
        if self.marker is None or self.marker == "slow":
            return None
        m = COVERED.match(self.marker)
        if not m:
            raise ValueError(f"{self.where}: marker {self.marker!r} must read 'not run (why); "
                             "covered by PATH' or 'slow'")
        if not (ROOT / m.group(2)).exists():
            raise ValueError(f"{self.where}: marker names {m.group(2)}, which does not exist")
        return f"{m.group(1)}; covered by {m.group(2)}"


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        out.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1).lower(),
                         m.group(2), marker.group(1).strip() if marker else None))
    return out


def _lomo_warnings() -> list[type]:
    import lomo_kernels

    return [v for v in vars(lomo_kernels).values()
            if isinstance(v, type) and issubclass(v, Warning)]


def _python_pages():
    for page in pages():
        runnable = [b for b in blocks(page) if b.lang == "python"]
        if runnable:
            slow = any(b.marker == "slow" for b in runnable)
            yield pytest.param(page, marks=[pytest.mark.slow] if slow else [],
                               id=str(page.relative_to(ROOT)))


def _bash_blocks():
    for page in pages():
        for b in blocks(page):
            if b.lang in ("bash", "sh", "shell", "console"):
                yield pytest.param(b, marks=[pytest.mark.slow] if b.marker == "slow" else [],
                                   id=b.where)


@pytest.mark.usefixtures("one_thread")  # small models: one thread is faster on a shared CPU
@pytest.mark.parametrize("page", list(_python_pages()))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    ran = 0
    with warnings.catch_warnings():
        for category in _lomo_warnings():
            warnings.simplefilter("error", category)
        for b in blocks(page):
            if b.lang != "python" or b.skip_reason():
                continue
            exec(compile(b.code, b.where, "exec"), namespace)  # noqa: S102 - the docs' own code
            ran += 1
    if not ran:
        pytest.skip("every python block of this page is run by the test its marker names")


@pytest.mark.parametrize("block", list(_bash_blocks()))
def test_bash_blocks_run(block):
    reason = block.skip_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{block.where} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


def test_markers_are_well_formed():
    """Every marker in the docs parses and names an existing test; a marker must sit right
    before a fence (else it marks nothing)."""
    for page in pages():
        for b in blocks(page):
            b.skip_reason()
        text = page.read_text()
        for m in MARKER.finditer(text):
            after = text[m.end():].lstrip(" \t").split("\n", 2)
            assert len(after) > 1 and after[1].startswith("```"), \
                f"{page.relative_to(ROOT)}: {m.group(0)} is not followed by a code block"


def test_a_marker_naming_a_missing_test_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- example: not run (needs a GPU); covered by tests/test_nope.py -->\n"
                    "```python\nraise SystemExit(1)\n```\n"
                    "<!-- example: skip it -->\n```bash\nfalse\n```\n")
    first, second = blocks(page)
    with pytest.raises(ValueError, match="does not exist"):
        first.skip_reason()
    with pytest.raises(ValueError, match="must read"):
        second.skip_reason()
