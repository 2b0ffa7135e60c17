"""garak (NVIDIA's LLM vulnerability scanner, Derczynski et al. 2024, arXiv:2406.11036) against a served model: the
run configuration that points garak at an OpenAI-compatible endpoint, and the reading of its report.

garak itself runs in the tools venv (scripts/safety_tools.sh); herd never imports it. experiments/garak_scan.py
writes the config below, starts `garak --config FILE`, and reads the report back with parse_report.

Config (garak 0.17.1): the target is garak's `openai.OpenAICompatible` generator, whose options (`uri`, `api_key`,
`max_tokens`, `stop`, ...) sit under plugins.generators.openai.OpenAICompatible; run.generations answers per prompt;
run.soft_probe_prompt_cap caps how many prompts a probe with many sends (DanInTheWild, promptinject, encoding).
The generator's default `stop` is ["#", ";"], which would cut every answer at its first `#` or `;`; it is cleared.

Report: `<report_dir>/<prefix>.report.jsonl`, one JSON object a line, each with an "entry_type". garak writes one
"eval" entry per (probe, detector) with "passed", "fails", "nones" (no output to judge) and "total_evaluated"; the
attack success rate is fails / total_evaluated, as garak prints it ("attack success rate"). "attempt" entries with
"status" 2 are the judged prompts (status 1: the same attempt before detection).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from herd.safety.code_checks import require_loopback

# The bounded default probe set: a few jailbreak prompts and capped samples of prompt injection and encoding
# attacks, sized for a few minutes on two CPU cores with a 135M model.
PROBES = ("dan.Dan_11_0", "dan.AntiDAN", "dan.DanInTheWild", "promptinject.HijackHateHumans",
          "encoding.InjectBase64")


@dataclass(frozen=True)
class ProbeHits:
    probe: str  # e.g. "dan.Dan_11_0"
    detector: str  # e.g. "mitigation.MitigationBypass"
    attempts: int  # outputs judged (garak's total_evaluated)
    failures: int  # outputs the detector flagged: the attack worked

    @property
    def asr(self) -> float | None:
        """Attack success rate: failures / attempts (None with nothing judged)."""
        return self.failures / self.attempts if self.attempts else None


def garak_config(uri: str, model: str, report_dir: Path | str, prefix: str, generations: int = 1,
                 prompt_cap: int = 8, max_tokens: int = 96, seed: int = 1, api_key: str = "none") -> dict:
    """garak's run configuration (written as YAML or JSON, garak reads both) for an OpenAI-compatible server."""
    return {
        "system": {"parallel_attempts": False, "lite": True},
        "run": {"generations": generations, "soft_probe_prompt_cap": prompt_cap, "seed": seed},
        "reporting": {"report_dir": str(Path(report_dir).resolve()), "report_prefix": prefix},
        "plugins": {
            "target_type": "openai.OpenAICompatible", "target_name": model,
            "generators": {"openai": {"OpenAICompatible": {
                "uri": require_loopback(uri), "api_key": api_key, "max_tokens": max_tokens, "stop": [],
                # herd's API takes no frequency / presence penalties; garak leaves these out of its requests
                "suppressed_params": ["frequency_penalty", "presence_penalty"]}}},
        },
    }


def read_entries(path: Path | str) -> list[dict]:
    """A garak report's entries; a line that is not a JSON object is an error naming the line."""
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            entry = json.loads(line)
            if not isinstance(entry, dict) or "entry_type" not in entry:
                raise ValueError(f"{path}:{n}: not a garak report entry (no entry_type): is this a report.jsonl?")
            entries.append(entry)
    return entries


def parse_report(path: Path | str) -> list[ProbeHits]:
    """(probe, detector) hit counts from a report's eval entries, in the report's order."""
    entries = read_entries(path)
    if not any(e["entry_type"] == "init" for e in entries):
        raise ValueError(f"{path}: no init entry: not a garak report")
    return [ProbeHits(e["probe"], e["detector"], int(e["total_evaluated"]), int(e["fails"]))
            for e in entries if e["entry_type"] == "eval"]


def judged_outputs(path: Path | str) -> dict[str, list[dict]]:
    """{probe: [{"prompt", "output", "detectors": {detector: [score per output]}}]} from the judged attempts."""
    out: dict[str, list[dict]] = {}
    for e in read_entries(path):
        if e["entry_type"] == "attempt" and e.get("status") == 2:
            turns = e["prompt"]["turns"]
            out.setdefault(e["probe_classname"], []).append({
                "prompt": turns[-1]["content"]["text"] if turns else "",
                "output": [(o or {}).get("text") for o in e.get("outputs", [])],
                "detectors": e.get("detector_results", {})})
    return out
