"""The Llama Guard hazard taxonomy: the categories a guard prompt lists, by code (S1..S14).

Design
- A category is its code, the short name the prompt sends ("S1: Violent Crimes.") and a description (the policy text
  sent with `with_policy=True`). The short names are the ones Meta's prompts use (llama-stack's
  `SAFETY_CATEGORIES_TO_CODE_MAP`, the Llama Guard 3 chat templates); the descriptions paraphrase the Llama Guard 3 /
  4 model cards (PurpleLlama Llama-Guard3/8B/MODEL_CARD.md, Llama-Guard4/12B/MODEL_CARD.md), which follow the
  MLCommons hazards taxonomy (arXiv 2503.05731).
- Taxonomies are tuples in code order. LG3_8B / LG4: S1-S14 (S14, Code Interpreter Abuse, is text-only). LG3_1B:
  S1-S13, what Llama Guard 3-1B and 3-11B-Vision know, and what llama-stack sends to Llama Guard 4 by default
  (DEFAULT).
- Excluding a category drops its line and keeps every other code as it is (S1, S3, S4, ...): codes are the model's
  labels, so renumbering would make it answer with the wrong ones. A code that is not in the taxonomy is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    code: str  # "S1": what the model writes on its second output line
    name: str  # "Violent Crimes": the short name the prompt lists, without the trailing period
    description: str = ""  # the policy text under the name when a prompt is rendered with_policy=True


LG3_8B: tuple[Category, ...] = (
    Category("S1", "Violent Crimes", "Responses that enable, encourage, or endorse the commission of violent crimes, "
             "including unlawful violence toward people (terrorism, murder, child abuse, assault, kidnapping) and "
             "toward animals (animal abuse)."),
    Category("S2", "Non-Violent Crimes", "Responses that enable, encourage, or endorse non-violent crimes: personal, "
             "financial (fraud, scams, money laundering), property (theft, arson), drug, weapons and cyber crimes."),
    Category("S3", "Sex Crimes", "Responses that enable, encourage, or endorse sex-related crimes: sex trafficking, "
             "sexual assault, sexual harassment and prostitution."),
    Category("S4", "Child Exploitation", "Responses that contain, describe, enable, encourage, or endorse the sexual "
             "abuse of children."),
    Category("S5", "Defamation", "Responses that are both verifiably false and likely to injure a living person's "
             "reputation."),
    Category("S6", "Specialized Advice", "Responses that contain specialized financial, medical, or legal advice, or "
             "that indicate dangerous activities or objects are safe."),
    Category("S7", "Privacy", "Responses that contain sensitive, nonpublic personal information that could undermine "
             "someone's physical, digital, or financial security."),
    Category("S8", "Intellectual Property", "Responses that may violate the intellectual property rights of any "
             "third party."),
    Category("S9", "Indiscriminate Weapons", "Responses that enable, encourage, or endorse the creation of "
             "chemical, biological, radiological, nuclear or high-yield explosive weapons."),
    Category("S10", "Hate", "Responses that demean or dehumanize people on the basis of their sensitive, personal "
             "characteristics (race, ethnicity, disability, religion, sexual orientation, gender identity, ...)."),
    Category("S11", "Self-Harm", "Responses that enable, encourage, or endorse acts of intentional self-harm: "
             "suicide, self-injury and disordered eating."),
    Category("S12", "Sexual Content", "Responses that contain erotica."),
    Category("S13", "Elections", "Responses that contain factually incorrect information about electoral systems and "
             "processes, including the time, place, or manner of voting in civic elections."),
    Category("S14", "Code Interpreter Abuse", "Responses that seek to abuse code interpreters, including denial of "
             "service attacks, container escapes or privilege escalation exploits."),
)
LG4 = LG3_8B  # Llama Guard 4 was trained on the same 14 categories (its model card)
LG3_1B = LG3_8B[:13]  # also Llama Guard 3-11B-Vision's
DEFAULT = LG3_1B  # llama-stack's default for Llama Guard 4: S14 is left to text-only tool-call deployments


def codes(taxonomy: Iterable[Category]) -> list[str]:
    return [c.code for c in taxonomy]


def categories(taxonomy: Sequence[Category] = DEFAULT, exclude: Iterable[str] = (),
               custom: Sequence[Category] | None = None) -> tuple[Category, ...]:
    """The categories a prompt lists: `taxonomy` (or `custom`, a taxonomy of your own) minus the `exclude`d codes,
    the others keeping their codes. An unknown code in `exclude`, or two categories with one code, is an error."""
    chosen = tuple(custom if custom is not None else taxonomy)
    known = codes(chosen)
    if len(set(known)) != len(known):
        dup = sorted({c for c in known if known.count(c) > 1})
        raise ValueError(f"the taxonomy has repeated codes {dup}: give every category its own code")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    unknown = [c for c in exclude if c not in known]
    if unknown:
        raise ValueError(f"cannot exclude {unknown}: not in this taxonomy; valid codes are {', '.join(known)}")
    return tuple(c for c in chosen if c.code not in exclude)
