#!/usr/bin/env bash
# Installs what the `process` backend and its tests need on a Debian-like host: bubblewrap (the
# sandbox every command runs in), pytest for the system Python (SWE verification), git, and
# numpy for the system Python (the parity suite runs its numpy programs natively too), and for
# the notebook and report tests nbformat's validator, `jupyter nbconvert` and a headless chromium
# (tests/all/report.rs).
# Idempotent: does nothing when they are all there already.
set -euo pipefail

PYTHON=/usr/bin/python3

have_all() {
    command -v bwrap >/dev/null 2>&1 &&
        command -v git >/dev/null 2>&1 &&
        "$PYTHON" -m pytest --version >/dev/null 2>&1 &&
        "$PYTHON" -c 'import numpy' >/dev/null 2>&1 &&
        "$PYTHON" -c 'import nbformat' >/dev/null 2>&1 &&
        command -v jupyter-nbconvert >/dev/null 2>&1 &&
        command -v chromium >/dev/null 2>&1
}

if have_all; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "setup-host: bubblewrap, git, pytest, numpy, nbformat, nbconvert or chromium is missing and this user cannot install packages (not root, no sudo)" >&2
    echo "setup-host: install the Debian packages bubblewrap, python3-pytest, python3-numpy, git," >&2
    echo "setup-host:   python3-nbformat, jupyter-nbconvert and chromium, then run this again" >&2
    exit 1
fi

PACKAGES=(bubblewrap python3-pytest python3-numpy git python3-nbformat jupyter-nbconvert chromium)
echo "setup-host: installing ${PACKAGES[*]}" >&2
"${as_root[@]}" apt-get update
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y "${PACKAGES[@]}"

if ! have_all; then
    echo "setup-host: the packages installed, but bwrap, git, '$PYTHON -m pytest', numpy, nbformat, jupyter-nbconvert or chromium still does not work" >&2
    exit 1
fi
