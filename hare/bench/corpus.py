"""The accuracy benchmark's corpus: the reStructuredText sources of the Python documentation (Debian's
``python3.11-doc``), converted to plain text and split by document into train, calibration and validation text.

Splitting whole documents (by a hash of their path, so the split is the same on every machine) keeps validation text
apart from what the model trains on and what the pruner calibrates on. ``scripts/fetch_corpus.sh`` downloads the
package and runs this module; the result lives in an ignored folder (``.corpus/``) that travels with the tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

SPLITS = ("train", "calib", "valid")
_HEADING = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")  # a line of one repeated mark: over/underline
_DIRECTIVE = re.compile(r"^(\s*)\.\.(\s+([\w:-]+)::(.*)|\s+_[^:]+:.*|\s.*|)$")
_DROPPED_DIRECTIVES = {"index", "toctree", "highlight", "module", "currentmodule", "moduleauthor", "sectionauthor",
                       "testsetup", "testcleanup", "raw", "only", "include", "literalinclude", "image", "figure",
                       "tabularcolumns", "audit-event", "opcode", "productionlist", "impl-detail"}
_ROLE = re.compile(r":[\w:-]+:`!?~?([^`<]*?)\s*(<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")
_LITERAL = re.compile(r"``(.+?)``")
_EMPHASIS = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")


def rst_to_text(rst: str) -> str:
    """Plain text of a reStructuredText document: prose and code examples kept; headings' rules, comments, labels
    and bookkeeping directives (index, toctree, ...) dropped; inline markup reduced to its text."""
    out, skip_indent = [], None
    for line in rst.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        m = _DIRECTIVE.match(line)
        if m:
            name, rest = m.group(3), (m.group(4) or "").strip()
            if name is None or name in _DROPPED_DIRECTIVES:  # comment, label or bookkeeping: drop its block too
                skip_indent = indent
            elif rest:  # e.g. ".. function:: print(*objects)": keep the signature
                out.append(" " * indent + rest)
            continue
        if _HEADING.match(line) or re.match(r"^\s*:[\w-]+:( |$)", line):  # heading rules, field lists (:noindex:)
            continue
        line = _LINK.sub(r"\1", _ROLE.sub(r"\1", line))
        line = _EMPHASIS.sub(r"\1", _LITERAL.sub(r"\1", line))
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def split_of(relpath: str) -> str:
    """train (90%), calib (5%) or valid (5%), from a hash of the document's path."""
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 20
    return "valid" if bucket == 0 else "calib" if bucket == 1 else "train"


def build(sources: Path, out_dir: Path, source_name: str) -> dict:
    """Convert every ``*.rst.txt`` under ``sources`` and write ``{train,calib,valid}.txt`` and ``corpus.json``."""
    docs = sorted(sources.rglob("*.rst.txt"))
    if not docs:
        raise SystemExit(f"{sources}: no *.rst.txt documentation sources found")
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in docs:
        rel = path.relative_to(sources).as_posix()
        parts[split_of(rel)].append(rst_to_text(path.read_text(encoding="utf-8", errors="replace")))
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"source": source_name, "documents": {s: len(parts[s]) for s in SPLITS}, "bytes": {}}
    for s in SPLITS:
        text = "\n\n".join(parts[s])
        (out_dir / f"{s}.txt").write_text(text, encoding="utf-8")
        info["bytes"][s] = len(text.encode())
    (out_dir / "corpus.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", type=Path, help="folder holding the *.rst.txt sources (html/_sources)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source-name", default="python3.11-doc", help="what the sources are (recorded)")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.sources, args.out_dir, args.source_name)))


if __name__ == "__main__":
    main()
