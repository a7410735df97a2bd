"""docs/refs.py, the README line-reference check, on the CPU: a right reference passes, a drifted one fails.

    python3 -m pytest -q python/tests/test_refs.py

Most tests run on a small fake repository (one chapter, one kernel file, one README); the last
runs the real check on this repository, as CI does.
"""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docs" / "refs.py"


def load_refs():
    spec = importlib.util.spec_from_file_location("docs_refs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


refs = load_refs()

KERNEL = """\
// line 1
__global__ void compute_scores(float* S) {
  S[0] = 1.f;
}

__global__ void softmax_rows(float* S) {
  float m = -INFINITY;
}
"""


def run_on(tmp_path, readme, kernel=KERNEL, other=None):
    chapter = tmp_path / "01_naive"
    chapter.mkdir()
    (chapter / "kernel.cu").write_text(kernel)
    if other:
        d = tmp_path / "02_flash_v1"
        d.mkdir()
        (d / "kernel.cu").write_text(other)
    doc = chapter / "README.md"
    doc.write_text(readme)
    return refs.check(str(tmp_path), [str(doc)])


def test_right_reference_passes(tmp_path):
    errors, n = run_on(tmp_path, "- `kernel.cu:2` `compute_scores`: S to HBM.\n"
                                 "- `:6-7` `softmax_rows`: the row's max.\n")
    assert errors == [] and n == 2


def test_drifted_reference_fails_and_says_what_it_expected(tmp_path):
    errors, n = run_on(tmp_path, "- `kernel.cu:3` `compute_scores`: S to HBM.\n")
    assert n == 1 and len(errors) == 1
    assert "`kernel.cu:3`" in errors[0] and "expected `compute_scores`" in errors[0]
    assert "01_naive/kernel.cu:3" in errors[0]


def test_range_must_hold_the_anchor(tmp_path):
    errors, _ = run_on(tmp_path, "- `kernel.cu:1-4` `softmax_rows`: wrong range.\n")
    assert len(errors) == 1 and "expected `softmax_rows`" in errors[0]


def test_reference_without_anchor_fails(tmp_path):
    errors, _ = run_on(tmp_path, "- `kernel.cu:2`: S to HBM.\n")
    assert len(errors) == 1 and "no anchor" in errors[0]


def test_line_past_the_end_fails(tmp_path):
    errors, _ = run_on(tmp_path, "- `kernel.cu:80` `compute_scores`: gone.\n")
    assert len(errors) == 1 and "has 9 lines" in errors[0]


def test_bare_reference_outside_backticks_fails(tmp_path):
    errors, _ = run_on(tmp_path, "| a | b |\n|---|---|\n| S | compute_scores (:12) |\n")
    assert len(errors) == 1 and "outside backticks" in errors[0]


def test_name_before_parenthesised_reference_is_its_anchor(tmp_path):
    errors, _ = run_on(tmp_path, "See `compute_scores` (`kernel.cu:2`) and `softmax_rows` (`kernel.cu:2`).\n")
    assert len(errors) == 1 and "expected `softmax_rows`" in errors[0]


def test_table_column_header_names_chapter_and_file(tmp_path):
    other = "// 02\n__global__ void flash_v1() {}\n"
    table = ("| what | 01 `kernel.cu` | 02 `kernel.cu` |\n|---|---|---|\n"
             "| S | `compute_scores` (`:2`) | `:2` `flash_v1` |\n")
    errors, n = run_on(tmp_path, table, other=other)
    assert errors == [] and n == 2
    # The same shorthand against the wrong chapter's file fails.
    bad = table.replace("`:2` `flash_v1`", "`:2` `compute_scores`")
    (tmp_path / "01_naive" / "README.md").write_text(bad)
    errors, _ = refs.check(str(tmp_path), [str(tmp_path / "01_naive" / "README.md")])
    assert len(errors) == 1 and "02_flash_v1/kernel.cu:2" in errors[0]


def test_generated_tables_and_code_blocks_are_skipped(tmp_path):
    errors, n = run_on(tmp_path, "```sh\nfoo kernel.cu:99\n```\n<!-- results:x -->\n| a |\n|---|\n| :99 |\n"
                                 "<!-- /results -->\n")
    assert errors == [] and n == 0


def test_this_repository_passes():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout
    assert "0 wrong" in out.stdout
