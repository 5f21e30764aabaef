"""The measured numbers in README.md and docs/*.md are the ones in the committed results files
(bench/results/): `python bench/render_docs.py --check` finds no difference and no missing file.
When this fails, run `python bench/render_docs.py` (after re-measuring, if a results file moved)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import render_docs  # noqa: E402
from bench.docgen import evidence_memory  # noqa: E402


def test_docs_match_the_results_files(capsys):
    rc = render_docs.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_every_generator_is_used_and_every_block_is_known():
    used = set()
    for path in render_docs.doc_files(ROOT):
        used |= set(render_docs.OPENING.findall(path.read_text()))
    assert used <= set(render_docs.GENERATORS), used - set(render_docs.GENERATORS)
    assert set(render_docs.GENERATORS) <= used, set(render_docs.GENERATORS) - used


@pytest.fixture
def copy_of_the_tree(tmp_path):
    """README.md, docs/ and bench/results/ copied, so the check can be broken on purpose."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results")
    return tmp_path


def test_check_fails_on_a_changed_number(copy_of_the_tree, capsys):
    results = copy_of_the_tree / "docs" / "results.md"
    text = results.read_text()
    block = re.search(r"<!-- results:memory -->(.*?)<!-- /results:memory -->", text, re.S)
    changed = block.group(1).replace("|", "| 9", 1)  # one cell of the table
    results.write_text(text.replace(block.group(1), changed))
    assert render_docs.main(["--check", "--root", str(copy_of_the_tree)]) == 1
    assert "docs/results.md" in capsys.readouterr().err
    # and the writer restores it
    assert render_docs.main(["--root", str(copy_of_the_tree)]) == 0
    assert results.read_text() == text


def test_check_fails_on_a_changed_inline_number(copy_of_the_tree, capsys):
    page = copy_of_the_tree / "docs" / "evidence.md"
    text = page.read_text()
    part = re.search(r"<!-- results:rounding-result -->(.*?)<!-- /results:rounding-result -->",
                     text)
    digit = re.search(r"\d", part.group(1))
    changed = part.group(1)[:digit.start()] + str((int(digit.group()) + 1) % 10) \
        + part.group(1)[digit.end():]
    page.write_text(text.replace(part.group(0), part.group(0).replace(part.group(1), changed)))
    assert render_docs.main(["--check", "--root", str(copy_of_the_tree)]) == 1
    assert "docs/evidence.md" in capsys.readouterr().err
    assert render_docs.main(["--root", str(copy_of_the_tree)]) == 0
    assert page.read_text() == text


def test_check_fails_on_a_missing_results_file(copy_of_the_tree, capsys):
    (copy_of_the_tree / "bench" / "results" / "cpu" / "convergence.json").unlink()
    assert render_docs.main(["--check", "--root", str(copy_of_the_tree)]) == 1
    assert "convergence.json: results file missing" in capsys.readouterr().err


def test_check_fails_on_an_unknown_or_unclosed_block(copy_of_the_tree, capsys):
    page = copy_of_the_tree / "docs" / "usage.md"
    page.write_text(page.read_text() + "\n<!-- results:nope --><!-- /results:nope -->\n"
                    "<!-- results:memory -->\n")
    assert render_docs.main(["--check", "--root", str(copy_of_the_tree)]) == 1
    err = capsys.readouterr().err
    assert "unknown results block 'nope'" in err and "has no closing marker" in err


def test_the_8b_estimates_cover_every_case_the_script_runs():
    # bench/memory_llama3_8b.sh runs cases in loops and one by one; the estimate table is built
    # from the script, so every case the script runs is read from it, each loop's included
    script = (ROOT / "bench" / "memory_llama3_8b.sh").read_text()
    runs = len(re.findall(r"^\s*case_ ", script, re.M))
    loops = re.findall(r"for name in (.*?); do", script, re.S)
    want = runs - len(loops) + sum(len(x.replace("\\", " ").split()) for x in loops)
    cases = evidence_memory.script_cases()
    assert len(cases) == want
    assert ("lomo_optim-adalomo", 2048, 256) in cases  # a case of the seq-2048 loop
    assert ("lk-lomo", 2048, None) in cases
