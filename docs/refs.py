#!/usr/bin/env python3
"""Line references in the READMEs, LAB.md files and notes, checked against the code they name.

    python3 docs/refs.py        exit 1 if a reference can no longer be right (CI: tables.py --check runs it)

A reference is a backticked `FILE:N` or `FILE:N-M` (FILE relative to the document's chapter, or to
the repository root), or the shorthand `:N` / `:N-M` for the file the last full reference named in the same section (bullets and
paragraphs) or table cell (in a table, the file named in the column's header, else in an earlier
cell of the row; a header that starts
with a chapter number, "03 `kernel.cu`", means that chapter's file). Every reference carries an
anchor, one short backticked name or code fragment:
    `kernel.cu:55` `compute_scores`        the span right after the reference, or
    `compute_scores` (`:55`)               the span right before a reference in parentheses,
and the anchor must occur on the referenced line (or within the referenced range). So a line
number that drifts away from its code fails here, not in a learner's editor. A `:NNN` outside
backticks is refused too (it would escape the check).
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "[0-9][0-9]_*/README.md", "[0-9][0-9]_*/LAB.md", "docs/NOTES-[0-9][0-9].md"]

SPAN = re.compile(r"`([^`]+)`")
REF = re.compile(r"^(?:(?P<file>[\w./-]+\.(?:cu|cuh|h|cpp|py|sh)))?:(?P<a>\d+)(?:-(?P<b>\d+))?$")
FILE = re.compile(r"[\w./-]+\.(?:cu|cuh|h|cpp|py|sh)$")
BARE = re.compile(r"(?<![\w`/:.])(?:[\w./-]+\.(?:cu|cuh|h|cpp))?:\d{2,}(?:-\d+)?(?![\w`])")


def doc_files(root):
    out = []
    for pattern in DOCS:
        out += sorted(glob.glob(os.path.join(root, pattern)))
    return out


def blocks(text):
    """(first line number, kind, text) for each bullet, paragraph or table row, outside code fences
    and generated tables."""
    out, cur, start, fenced, generated = [], [], 0, False, False

    def flush():
        if cur:
            out.append((start, "text", "\n".join(cur)))
        cur.clear()

    for no, line in enumerate(text.split("\n"), 1):
        s = line.strip()
        if s.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if s.startswith("<!-- results:"):
            flush()
            generated = True
            continue
        if s.startswith("<!-- /results"):
            generated = False
            continue
        if fenced or generated:
            continue
        if s.startswith("|"):
            flush()
            out.append((no, "row", s))
        elif s.startswith("#"):
            flush()
            out.append((no, "heading", s))
        elif not s or re.match(r"(- |\d+\. )", s):
            flush()
            if s:
                cur.append(s)
                start = no
        else:
            if not cur:
                start = no
            cur.append(s)
    flush()
    return out


def cells(row):
    return [c.strip() for c in row.strip().strip("|").split("|")]


def resolve(doc_dir, root, name, chapter_dir):
    """The file a reference names: in the table column's chapter, next to the document, or from the root."""
    for base in (chapter_dir, doc_dir, root):
        if base and os.path.isfile(os.path.join(base, name)):
            return os.path.join(base, name)
    return None


def check_segment(ctx, no, text, default_file, chapter_dir, errors, count):
    """Every reference in one bullet, paragraph or table cell; returns the file last named."""
    doc, doc_dir, root, lines_of = ctx
    spans = list(SPAN.finditer(text))
    outside = SPAN.sub(lambda m: " " * len(m.group(0)), text)
    for m in BARE.finditer(outside):
        errors.append(f"{doc}:{no}: {m.group(0)!r} is a line reference outside backticks (write `{m.group(0)}` `anchor`)")
    current = default_file
    for i, sp in enumerate(spans):
        content = sp.group(1)
        r = REF.match(content)
        if not r:
            continue
        count[0] += 1
        name = r.group("file") or current
        label = f"{doc}:{no}: `{content}`"
        if not name:
            errors.append(f"{label}: no file named before this shorthand reference")
            continue
        if r.group("file"):
            current = name
        path = resolve(doc_dir, root, name, chapter_dir)
        if not path:
            errors.append(f"{label}: file {name} not found")
            continue
        a, b = int(r.group("a")), int(r.group("b") or r.group("a"))
        lines = lines_of(path)
        if not (1 <= a <= b <= len(lines)):
            errors.append(f"{label}: {os.path.relpath(path, root)} has {len(lines)} lines")
            continue
        anchor = None
        after = spans[i + 1] if i + 1 < len(spans) else None
        before = spans[i - 1] if i > 0 else None
        if after and text[sp.end():after.start()].strip() == "" and not REF.match(after.group(1)):
            anchor = after.group(1)
        elif before and re.fullmatch(r"\s*\(\s*", text[before.end():sp.start()]) \
                and not REF.match(before.group(1)) and not FILE.match(before.group(1)):
            anchor = before.group(1)
        if anchor is None:
            errors.append(f"{label}: no anchor (a backticked name right after it, or `name` (`:N`) before it)")
            continue
        if not any(anchor in line for line in lines[a - 1:b]):
            errors.append(f"{label}: expected `{anchor}` on {os.path.relpath(path, root)}:{a}"
                          + (f"-{b}" if b != a else ""))
    return current


def check(root=ROOT, docs=None):
    """Errors (one string each) and the number of references checked."""
    cache = {}

    def lines_of(path):
        if path not in cache:
            with open(path, encoding="utf-8") as f:
                cache[path] = f.read().split("\n")
        return cache[path]

    errors, count = [], [0]
    for doc in docs or doc_files(root):
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(doc, root)
        ctx = (rel, os.path.dirname(os.path.abspath(doc)), root, lines_of)
        header, section_file = None, None
        for no, kind, body in blocks(text):
            if kind == "heading":
                header, section_file = None, None
                continue
            if kind == "text":
                # A bullet's shorthand may lean on the file the section last named.
                header = None
                section_file = check_segment(ctx, no, body, section_file, None, errors, count)
                continue
            row = cells(body)
            if all(re.fullmatch(r":?-+:?", c) for c in row):
                continue
            if header is None:
                header = row
                continue
            row_file = None  # a file named in an earlier cell of the row ("where | what" tables)
            for col, cell in enumerate(row):
                default, chapter = row_file, None
                if col < len(header):
                    h = header[col]
                    f = [s for s in SPAN.findall(h) if FILE.match(s)]
                    default = f[0] if f else row_file
                    n = re.match(r"(\d\d)\b", h)
                    if n:
                        hits = glob.glob(os.path.join(root, n.group(1) + "_*"))
                        chapter = hits[0] if hits else None
                last = check_segment(ctx, no, cell, default, chapter, errors, count)
                if last != default:
                    row_file = last
    return errors, count[0]


def main():
    errors, n = check()
    for e in errors:
        print(e)
    print(f"refs: {n} line references checked, {len(errors)} wrong")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
