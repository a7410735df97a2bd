"""bench/lab, the workshop tool, on the CPU: marker parsing, the blanks, start/--force, check without a GPU.

    python3 -m pytest -q python/tests/test_lab_tool.py

Most tests run on a small fake repository (a CMakeLists.txt with one add_chapter() line and one
kernel file); the last ones run the real script on this repository. Nothing here compiles.
"""
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "lab"


def load_tool():
    loader = importlib.machinery.SourceFileLoader("bench_lab", str(SCRIPT))
    spec = importlib.util.spec_from_loader("bench_lab", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


KERNEL = """\
__global__ void scale(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  // LAB-BEGIN(bounds): only the first n threads write
  // LAB-STUB: const bool inside = false;
  const bool inside = i < n;
  // LAB-END(bounds)
  if (inside) {
    // LAB-BEGIN(double-it): x_i = 2 x_i
    x[i] = 2.f * x[i];
    // LAB-END(double-it)
  }
}
"""


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A fake repository with one chapter, 01_demo, and the tool pointed at it."""
    (tmp_path / "CMakeLists.txt").write_text("add_chapter(01_demo SOURCES kernel.cu)\n")
    (tmp_path / "01_demo").mkdir()
    (tmp_path / "01_demo" / "kernel.cu").write_text(KERNEL)
    (tmp_path / "01_demo" / "LAB.md").write_text("`bounds` `double-it`\n<!-- results:lab:01_demo -->\n")
    tool = load_tool()
    monkeypatch.setattr(tool, "ROOT", str(tmp_path))
    monkeypatch.setitem(tool.TIMED, "01_demo", [("", tool.decode(1, 1024))])
    return tool, tmp_path


def kernel_with(repo, text):
    tool, root = repo
    (root / "01_demo" / "kernel.cu").write_text(text)
    return tool


def test_regions_parse_and_blank(repo):
    tool, root = repo
    (name, path, lines, regions), = tool.exercises("01_demo")
    assert name == "kernel.cu"
    assert [(r.id, r.begin, r.end, r.stubs) for r in regions] == [
        ("bounds", 3, 6, ["const bool inside = false;"]), ("double-it", 8, 10, [])]
    blanked = tool.blank(lines, regions)
    assert "  // TODO(bounds): only the first n threads write\n" in blanked
    assert "  const bool inside = false;\n" in blanked   # the stub, at the region's indentation
    assert "    // TODO(double-it): x_i = 2 x_i\n" in blanked
    assert "i < n" not in blanked and "2.f * x[i]" not in blanked  # each blank removes its code
    assert "LAB-" not in blanked
    solution = "\n".join(l for l in KERNEL.split("\n") if "LAB-" not in l)
    assert tool.blank(lines, regions, filled=True) == solution


@pytest.mark.parametrize("text, where, what", [
    (KERNEL.replace("  // LAB-END(bounds)\n", ""), 7, "inside region 'bounds'"),   # nested BEGIN
    (KERNEL.replace("    // LAB-BEGIN(double-it): x_i = 2 x_i\n", ""), 9, "without a LAB-BEGIN"),
    (KERNEL.replace("LAB-END(double-it)", "LAB-END(bounds)"), 10, "closes region 'double-it'"),
    (KERNEL.replace("    // LAB-END(double-it)\n", ""), 8, "never closed"),
    (KERNEL.replace("LAB-BEGIN(bounds):", "LAB-BEGIN(Bounds):"), 3, "malformed marker"),
    (KERNEL.replace("// LAB-END(bounds)", "// LAB-END(bounds) trailing words"), 6, "malformed marker"),
    (KERNEL.replace("LAB-BEGIN(double-it): x_i = 2 x_i", "LAB-BEGIN(double-it):"), 8, "malformed marker"),
    (KERNEL.replace("    x[i] = 2.f * x[i];\n", "    // nothing here\n"), 8, "holds no code"),
    (KERNEL.replace("  // LAB-STUB: const bool inside = false;\n", "").replace(
        "  const bool inside = i < n;\n", "  const bool inside = i < n;\n  // LAB-STUB: bool x;\n"), 5,
     "LAB-STUB must follow"),
    (KERNEL.replace("double-it", "bounds"), 8, "used twice"),
])
def test_malformed_markers_are_refused_with_file_and_line(repo, text, where, what):
    tool = kernel_with(repo, text)
    with pytest.raises(tool.LabError) as e:
        tool.exercises("01_demo")
    assert f"01_demo/kernel.cu:{where}:" in str(e.value)
    assert what in str(e.value)


def test_markers_outside_the_chapter_sources_are_refused(repo):
    tool, root = repo
    (root / "01_demo" / "helper.cuh").write_text("// LAB-BEGIN(x): y\nint a;\n// LAB-END(x)\n")
    with pytest.raises(tool.LabError, match="helper.cuh: has LAB markers but is not a source"):
        tool.exercises("01_demo")


def test_verify_checks_lab_md(repo, capsys):
    tool, root = repo
    assert tool.main(["verify", "--no-build"]) == 0
    (root / "01_demo" / "LAB.md").write_text("`bounds`\n<!-- results:lab:01_demo -->\n")
    assert tool.main(["verify", "--no-build"]) == 2
    assert "does not describe exercise `double-it`" in capsys.readouterr().err


def test_start_writes_the_workspace_and_refuses_to_overwrite_work(repo, capsys):
    tool, root = repo
    labs = root / "labs"
    ws = labs / "01_demo"
    assert tool.main(["start", "01", "--labs", str(labs)]) == 0
    mine = ws / "kernel.cu"
    assert "TODO(bounds)" in mine.read_text() and "TODO(double-it)" in mine.read_text()
    assert (root / "01_demo" / "kernel.cu").read_text() == KERNEL  # the solution is untouched
    assert json.loads((ws / tool.MANIFEST).read_text())["chapter"] == "01_demo"
    # Unchanged since start: starting again is harmless.
    assert tool.main(["start", "01_demo", "--labs", str(labs)]) == 0
    # With work in it: refused, and the work is kept.
    mine.write_text(mine.read_text().replace("const bool inside = false;", "const bool inside = i < n;"))
    work = mine.read_text()
    assert tool.main(["start", "01", "--labs", str(labs)]) == 1
    assert "holds work (kernel.cu)" in capsys.readouterr().err
    assert mine.read_text() == work
    # A file the learner added counts as work too.
    (ws / "notes.txt").write_text("mine")
    assert tool.main(["start", "01", "--labs", str(labs)]) == 1
    # --force starts over.
    assert tool.main(["start", "01", "--force", "--labs", str(labs)]) == 0
    assert "TODO(bounds)" in mine.read_text() and not (ws / "notes.txt").exists()
    # A folder not made by start (no record) is never overwritten without --force.
    (ws / tool.MANIFEST).unlink()
    assert tool.main(["start", "01", "--labs", str(labs)]) == 1


def test_start_filled_gives_the_solution_without_markers(repo):
    tool, root = repo
    assert tool.main(["start", "01", "--filled", "--labs", str(root / "labs")]) == 0
    text = (root / "labs" / "01_demo" / "kernel.cu").read_text()
    assert text == "\n".join(l for l in KERNEL.split("\n") if "LAB-" not in l)


def test_unknown_chapter_is_refused_by_name(repo, capsys):
    tool, _ = repo
    assert tool.main(["start", "09", "--labs", "/nonexistent"]) == 2
    assert "unknown chapter '09'" in capsys.readouterr().err


# The real script on this repository.

def run_script(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT)] + list(args), capture_output=True, text=True,
                          env=env, cwd=REPO)


def test_every_chapter_markers_are_well_formed():
    p = run_script("verify", "--no-build")
    assert p.returncode == 0, p.stderr
    assert "verify: markers ok" in p.stdout


def test_list_has_one_line_per_exercise():
    p = run_script("list")
    assert p.returncode == 0, p.stderr
    assert any(l.startswith("02_flash_v1 2. rescale (kernel.cu:") for l in p.stdout.splitlines())


def test_timed_variants_are_the_chapters_own():
    """`check` times each TIMED variant with the chapter's --variant: a name its command line does not
    have (07's step-1 variants are dequant_<scheme>) would only fail on a GPU. Asks the chapters'
    programs for their variants (an unknown name is refused before any GPU work); needs them built."""
    lib = os.environ.get("LAB_ATTENTION_LIB")
    bindir = pathlib.Path(lib).resolve().parents[1] / "bin" if lib else REPO / "build" / "bin"
    asked = 0
    for ch, timed in load_tool().TIMED.items():
        program = bindir / ch
        if not program.exists() or not any(v for v, _ in timed):
            continue
        p = subprocess.run([str(program), "--variant", "no-such-variant"], capture_output=True, text=True)
        assert p.returncode == 2 and "(allowed: " in p.stderr, p.stderr
        have = p.stderr.split("(allowed: ", 1)[1].rsplit(")", 1)[0].split(", ")
        for variant, _ in timed:
            assert not variant or variant in have, f"{ch}: TIMED names --variant '{variant}'; it has {have}"
        asked += 1
    if not asked:
        pytest.skip(f"no chapter program with named variants built in {bindir}")


def test_check_without_a_gpu_exits_3_and_builds_nothing(tmp_path):
    labs, build = tmp_path / "labs", tmp_path / "build-lab"
    assert run_script("start", "01", "--labs", str(labs)).returncode == 0
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no device, even on a GPU machine
    p = run_script("check", "01", "--labs", str(labs), "--build-dir", str(build), env=env)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "no GPU" in p.stderr
    assert not build.exists()


def test_score_rule(capsys):
    """70 points shared by the tests, 30 by the timed shapes: full at 90% of the solution's speed."""
    tool = load_tool()
    s = tool.decode(8, 4096)
    fast, ref, slow = {"gbps": "2900"}, {"gbps": "3000"}, {"gbps": "1350"}  # 0.97x and 0.45x
    rc = tool.report("04_flash_decoding", "a GPU", [("t1", True), ("t2", True)],
                     [("", s, fast, ref), ("", s, slow, ref)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "score: 92.5 / 100  (correctness 70.0/70, speed 22.5/30" in out
    # A failed test costs its share and makes the exit code 1; a failed check earns no speed points.
    rc = tool.report("04_flash_decoding", "a GPU", [("t1", True), ("t2", False)], [("", s, None, ref)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "score: 35.0 / 100  (correctness 35.0/70, speed 0.0/30" in out
    assert "FAILED" in out


def test_catch2_xml_report_parsing(tmp_path):
    """A report cut short by a crash keeps the finished cases and adds a failed row."""
    tool = load_tool()
    prog = tmp_path / "fake_test"
    prog.write_text(f"""#!{sys.executable}
import sys
print("test seed: 42 (LAB_TEST_SEED=42 repeats this run)")
out = sys.argv[sys.argv.index("-o") + 1]
body = ('<?xml version="1.0"?><Catch><Group>'
        '<TestCase name="a &amp;b"><Section name="s"><OverallResults successes="1"/></Section>'
        '<OverallResult success="true"/></TestCase>'
        '<TestCase name="second"><Expression success="false"/><OverallResult success="false"/></TestCase>')
if "crash" in sys.argv[1]:
    open(out, "w").write(body + '<TestCase name="third"><Expression success="true"/>')
    sys.exit(134)
open(out, "w").write(body + '</Group></Catch>')
sys.exit(1)
""")
    prog.chmod(0o755)
    tests, seed = tool.gpu_tests(str(prog), str(tmp_path / "log"))
    assert tests == [("a &b", True), ("second", False)] and seed == "42"
    tests, _ = tool.gpu_tests(str(prog), str(tmp_path / "log"), tag="[crash]")
    assert tests[:2] == [("a &b", True), ("second", False)]
    assert len(tests) == 3 and not tests[2][1] and "exit 134" in tests[2][0]
