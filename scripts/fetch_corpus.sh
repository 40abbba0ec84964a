#!/usr/bin/env bash
# Build the accuracy benchmark's corpus (hare.bench.corpus): Debian's python3.11-doc, its reStructuredText sources
# converted to plain text and split by document into train / calib / valid. Writes OUT_DIR (default .corpus/,
# ignored by git; about 11 MiB), which travels with the working tree to the GPU machine (scripts/accuracy_run.sh).
# Usage: bash scripts/fetch_corpus.sh [OUT_DIR]     (needs apt-get, dpkg-deb and the project's .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.corpus}
python=${PYTHON:-.venv/bin/python}
package=python3.11-doc
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download "$package" >/dev/null 2>"$tmp/apt.log") || { cat "$tmp/apt.log" >&2; exit 1; }
deb=$(ls "$tmp"/*.deb)
dpkg-deb -x "$deb" "$tmp/root"
version=$(dpkg-deb -f "$deb" Version)
"$python" -m hare.bench.corpus "$tmp/root/usr/share/doc/python3.11/html/_sources" "$out" \
    --source-name "Debian $package $version (reStructuredText sources of the Python documentation)"
