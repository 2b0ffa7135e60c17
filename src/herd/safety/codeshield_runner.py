"""Run Meta's CodeShield (its Insecure Code Detector) on code snippets: JSON in on stdin, JSON out on stdout.

This file runs with the tools venv's Python (`.venv-tools/bin/python src/herd/safety/codeshield_runner.py`, built by
scripts/safety_tools.sh), never inside herd: herd.safety.code_checks starts it as a subprocess, so herd's own .venv
never imports codeshield or semgrep. It imports nothing from herd, and codeshield only inside main(), so the
protocol below is testable without the tools.

Protocol. stdin: a JSON list of {"id": str, "language": "python" | "c" | "javascript" | ..., "code": str}.
stdout: a JSON list, one entry per input in the same order:
  {"id": str, "insecure": bool, "issues": [{"rule", "cwe", "severity", "line", "analyzer", "description"}],
   "error": str | null}
"rule" is CodeShield's pattern id (e.g. "insecure-md5-hash-usage", "bugprone-strcpy").

Each snippet goes through CodeShield's own detector call, insecure_code_detector.analyze, with one of its two rule
sets (`--usecase`): "cyberseceval" (default), the full rule set CyberSecEval's insecure-code benchmarks score with
(regex and semgrep rules, every match), or "codeshield", the smaller high-precision set CodeShield.scan_code uses
to screen answers at serving time (it stops at the first regex match and runs semgrep only after a prescan regex).
Two details of CodeShield 1.0.1 shape this runner:
- CodeShield.scan_code logs and swallows any exception and reports the code as secure; here an exception becomes
  the snippet's "error", so a broken install cannot pass for secure code.
- For a snippet it writes to an absolute temporary path it runs semgrep with `--project-root /`, and recent semgrep
  releases then scan no file at all (an empty "paths.scanned"), silently dropping every semgrep rule. The runner
  writes each snippet itself to a relative path inside a fresh temporary working folder and hands that path to the
  detector, which then runs semgrep without `--project-root`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXTENSIONS = {"python": ".py", "c": ".c", "cpp": ".cpp", "javascript": ".js", "java": ".java", "php": ".php",
              "rust": ".rs", "csharp": ".cs", "kotlin": ".kt", "swift": ".swift", "ruby": ".rb"}


def _value(x: Any) -> Any:
    """An enum's value (CodeShield's Severity / Analyzer are str enums), anything else as it is."""
    return getattr(x, "value", x)


def issue_json(issue: Any) -> dict:
    """One CodeShield Issue as the protocol's dict. Semgrep names a rule by its config path plus the rule id
    ("...rules.semgrep._generated_.insecure-os-system-use"); only the last part is the rule's name."""
    rule = issue.pattern_id or issue.name or issue.rule or ""
    return {"rule": str(rule).rsplit(".", 1)[-1], "cwe": issue.cwe_id, "severity": _value(issue.severity),
            "line": issue.line, "analyzer": _value(issue.analyzer), "description": issue.description}


def scan_all(items: list[dict], scan: Callable[[str, str], list[Any]]) -> list[dict]:
    """Every snippet through `scan(language, code) -> issues`; a failing scan is that snippet's error."""
    out = []
    for item in items:
        try:
            issues = [issue_json(i) for i in scan(item["language"], item["code"])]
            out.append({"id": item["id"], "insecure": bool(issues), "issues": issues, "error": None})
        except Exception as e:  # noqa: BLE001 - reported per snippet; the others still run
            out.append({"id": item["id"], "insecure": False, "issues": [], "error": f"{type(e).__name__}: {e}"})
    return out


def codeshield_scan(language: str, code: str, usecase: str = "cyberseceval") -> list[Any]:
    """CodeShield's detector on one snippet, written to a relative path (see the module docstring)."""
    import asyncio

    from codeshield.insecure_code_detector import insecure_code_detector
    from codeshield.insecure_code_detector.languages import Language
    from codeshield.insecure_code_detector.usecases import UseCase

    lang = Language(language)  # ValueError for a language CodeShield does not know
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            path = Path("snippet" + EXTENSIONS.get(language, ".txt"))
            path.write_text(code)
            return asyncio.run(insecure_code_detector.analyze(lang, code, path=path, usecase=UseCase(usecase)))
        finally:
            os.chdir(old)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--usecase", choices=("cyberseceval", "codeshield"), default="cyberseceval")
    usecase = ap.parse_args(argv).usecase
    os.environ.setdefault("SEMGREP_ENABLE_VERSION_CHECK", "0")  # semgrep otherwise waits on a network check
    os.environ.setdefault("SEMGREP_SEND_METRICS", "off")
    items = json.load(sys.stdin)
    json.dump(scan_all(items, lambda lang, code: codeshield_scan(lang, code, usecase)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
