#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (the README's test command).
# torch==2.13.0 is installed first and explicitly: it is the CPU wheel on this machine's disk,
# and pinning it keeps pip from resolving camelid's open torch range to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[test]'
python -m camelid.kernels  # build camelid's CPU kernels once (tests skip theirs where this cannot build)
python -m pytest -q "$@"
