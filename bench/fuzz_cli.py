#!/usr/bin/env python3
"""Fuzzes the command line of every program of the lab (each chapter's CLI, the ladder, 07's table).

Generates seeded random command lines (known and unknown flags, good and bad values, repeats,
empty values, overflows, `--flag=value` forms) and runs each program on them with no GPU visible
(CUDA_VISIBLE_DEVICES=""), so that nothing is timed and a valid line stops at exit code 3. Each run
must exit 0, 2 or 3, print exactly one line on stderr for 2 and 3, and never crash (a signal, any
other exit code, or a sanitizer report). The programs are the ones built in --bin; in CI they are
also built with -fsanitize=address,undefined (LAB_SANITIZE=ON, the sm_75 build: the CUDA executables
themselves, their host code instrumented), and this script reads the sanitizers' reports.

  python3 bench/fuzz_cli.py --bin build/bin [--seed 1] [--lines 300]
"""
import argparse
import os
import random
import subprocess
import sys

CHAPTER_FLAGS = {
    "--batch": "int", "--heads": "int", "--heads-kv": "int", "--seqlen-q": "int", "--seqlen-kv": "int",
    "--seqlen": "int", "--head-dim": "int", "--splits": "int", "--page-size": "int", "--warmup": "int",
    "--iters": "int", "--seed": "int", "--dtype": ["fp16", "bf16", "fp32", ""], "--dist":
    ["normal", "large_logits", "outliers", "cauchy"], "--csv": "path", "--variant":
    ["", "naive", "cublas", "fa2", "mma", "overlap", "fp16", "int8_head", "nope"],
    "--causal": None, "--alibi": None, "--lse": None, "--check": None, "--no-ceilings": None,
}
LADDER_FLAGS = {
    "--grid": ["prefill", "decode", "all", "", "both"], "--quick": None, "--only":
    ["01_naive", "03_flash_v2,06_gqa_alibi", "", ",", "01_naive,", "08_flash_v3", "xx"],
    "--out": "dir", "--max-seconds": "float", "--seed": "int",
}
TABLE_FLAGS = {"--out": "dir", "--seed": "int", "--max-seconds": "float"}

INTS = ["1", "2", "17", "64", "128", "256", "4096", "0", "-1", "65536", "1048576", "2147483648",
        "99999999999999999999", "-9223372036854775808", "5x", "1e3", "0x10", " 3", "", "nan", "--",
        "+4", "3.5", "\u00e9"]
FLOATS = ["1", "0.5", "0", "-1", "nan", "inf", "-inf", "1e308", "1e-9", "2x", "", " 1", "1e", "3600.1"]
PATHS = ["out.csv", "", "/nonexistent/dir/out.csv", "/", "a" * 300]
DIRS = [".", "", "/nonexistent/dir", "/proc/1", "out.csv"]
JUNK = ["--nope", "-x", "--", "-", "--batch=", "--=3", "positional", "--help=1", "--causal=1", "-h"]


def value(rng, kind):
    if isinstance(kind, list):
        return rng.choice(kind)
    return rng.choice({"int": INTS, "float": FLOATS, "path": PATHS, "dir": DIRS}[kind])


def command_line(rng, flags):
    args = []
    names = list(flags)
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.1:
            args.append(rng.choice(JUNK))
            continue
        flag = rng.choice(names)
        kind = flags[flag]
        if kind is None:
            args.append(flag)
        elif r < 0.25:
            args.append(flag + "=" + value(rng, kind))
        elif r < 0.3:
            args.append(flag)  # the value left out
        else:
            args += [flag, value(rng, kind)]
        if rng.random() < 0.1:
            args += args[-2:] if kind is not None and len(args) >= 2 else [flag]  # a repeat
    return args


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="the build's bin/ folder")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lines", type=int, default=300, help="command lines in all (spread over programs)")
    a = ap.parse_args()

    programs = []
    for name in sorted(os.listdir(a.bin)):
        path = os.path.join(a.bin, name)
        if not os.access(path, os.X_OK) or name.endswith("_test") or name.startswith("tune03"):
            continue
        if name == "ladder":
            programs.append((name, path, LADDER_FLAGS))
        elif name == "07_kv_quant_table":
            programs.append((name, path, TABLE_FLAGS))
        elif name[:2].isdigit():
            programs.append((name, path, CHAPTER_FLAGS))
    if not programs:
        sys.exit(f"fuzz_cli: no programs in {a.bin}")

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               ASAN_OPTIONS="protect_shadow_gap=0:detect_leaks=0:abort_on_error=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    rng = random.Random(a.seed)
    work = os.path.join(os.getcwd(), "fuzz_cli.tmp")
    os.makedirs(work, exist_ok=True)
    failures, counts = [], {}
    per_program = max(1, a.lines // len(programs))
    for name, path, flags in programs:
        lines = [[], ["--help"]] + [command_line(rng, flags) for _ in range(per_program)]
        for args in lines:
            try:
                p = subprocess.run([path] + args, cwd=work, env=env, capture_output=True, text=True,
                                   errors="replace", timeout=60)
            except subprocess.TimeoutExpired:
                failures.append((name, args, "timed out after 60 s"))
                continue
            err = p.stderr.strip().splitlines()
            counts[p.returncode] = counts.get(p.returncode, 0) + 1
            why = None
            if any("Sanitizer" in l or "runtime error:" in l for l in err):
                why = "sanitizer report"
            elif p.returncode not in (0, 2, 3):
                why = f"exit code {p.returncode}"
            elif p.returncode in (2, 3) and len(err) != 1:
                why = f"exit code {p.returncode} with {len(err)} lines on stderr (want 1)"
            if why:
                failures.append((name, args, why + ("\n      " + "\n      ".join(err[:8]) if err else "")))
    total = sum(counts.values())
    print(f"fuzz_cli: {total} command lines through {len(programs)} programs (seed {a.seed}); "
          f"exit codes: {dict(sorted(counts.items()))}")
    for name, args, why in failures[:20]:
        print(f"  FAIL {name} {' '.join(repr(x) for x in args)}: {why}")
    if failures:
        print(f"fuzz_cli: {len(failures)} of {total} failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
