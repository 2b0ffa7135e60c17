#!/usr/bin/env bash
# Build .venv-tools: the outside safety tools herd is measured with, kept out of herd's own .venv.
#
#   garak 0.17.1       NVIDIA's LLM vulnerability scanner (experiments/garak_scan.py drives it against `herd serve`)
#   codeshield 1.0.1   Meta's CodeShield / Insecure Code Detector (herd.safety.code_checks calls it through
#                      src/herd/safety/codeshield_runner.py), with semgrep 1.187.0, the engine behind its rules
#                      (newer than CodeShield was released with: the runner works around one change, see there)
#
# These tools pull large and conflicting pins (garak alone brings transformers, nltk, openai, ...), so herd's .venv
# never imports them: herd talks to them only through subprocesses. torch==2.13.0 (the Makefile's TORCH_SPEC) sits
# in the same pip command as the tools, so the resolver takes that build (on a machine whose pip finds the CPU
# wheel, the CPU one) instead of pulling whatever torch garak's dependencies would bring (a CUDA build from PyPI).
# Idempotent: a finished venv (stamp file present) is left alone; delete .venv-tools to rebuild.
# Run it through `make safety-tools`; not part of `make test` (CI never builds it).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TOOLS_VENV="${TOOLS_VENV:-.venv-tools}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$TOOLS_VENV/.tools-installed"

if [ -f "$STAMP" ]; then
	echo "$TOOLS_VENV already built (delete it to rebuild)"
	exit 0
fi
[ -x "$TOOLS_VENV/bin/python" ] || "$PYTHON" -m venv "$TOOLS_VENV"
"$TOOLS_VENV/bin/python" -m pip install --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry --index-url, as the Makefile's does
"$TOOLS_VENV/bin/python" -m pip install $TORCH_SPEC garak==0.17.1 codeshield==1.0.1 semgrep==1.187.0
"$TOOLS_VENV/bin/python" -c "import garak, codeshield; print('garak', garak.__version__, '+ codeshield ready')"
# semgrep checks for a newer release over the network unless told not to, and waits on that check
SEMGREP_ENABLE_VERSION_CHECK=0 "$TOOLS_VENV/bin/semgrep" --version
touch "$STAMP"
