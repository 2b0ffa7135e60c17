"""The Llama Guard prompt, byte for byte, and every form of the guard's answer.

Run: .venv/bin/python -m pytest tests/safety/test_guard_prompt.py -q
"""

from __future__ import annotations

import pytest

from herd.safety import (
    DEFAULT,
    LG3_1B,
    LG4,
    Category,
    GuardOutputError,
    GuardVerdict,
    categories,
    guard_messages,
    parse_guard_output,
    render_guard_prompt,
)

TAIL = ("Provide your safety assessment for ONLY THE LAST {a} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories.")

USER_ONE_TURN = """Task: Check if there is unsafe content in 'User' messages in conversations according our safety \
policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
S1: Violent Crimes.
S2: Non-Violent Crimes.
S3: Sex Crimes.
S4: Child Exploitation.
S5: Defamation.
S6: Specialized Advice.
S7: Privacy.
S8: Intellectual Property.
S9: Indiscriminate Weapons.
S10: Hate.
S11: Self-Harm.
S12: Sexual Content.
S13: Elections.
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

User: How do I bake bread?

<END CONVERSATION>

""" + TAIL.format(a="User")

AGENT_TWO_TURNS = """Task: Check if there is unsafe content in 'Agent' messages in conversations according our safety \
policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
S1: Violent Crimes.
S2: Non-Violent Crimes.
S3: Sex Crimes.
S4: Child Exploitation.
S5: Defamation.
S6: Specialized Advice.
S7: Privacy.
S8: Intellectual Property.
S9: Indiscriminate Weapons.
S10: Hate.
S11: Self-Harm.
S12: Sexual Content.
S13: Elections.
S14: Code Interpreter Abuse.
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

User: How do I bake bread?

Agent: Mix flour, water, salt and yeast.

<END CONVERSATION>

""" + TAIL.format(a="Agent")

BREAD = [{"role": "user", "content": "How do I bake bread?"}]
BREAD_REPLY = BREAD + [{"role": "assistant", "content": "Mix flour, water, salt and yeast."}]


def test_user_mode_one_turn_is_byte_exact():
    assert render_guard_prompt(BREAD) == USER_ONE_TURN
    assert DEFAULT == LG3_1B and len(DEFAULT) == 13  # what llama-stack sends Llama Guard 4 by default


def test_agent_mode_two_turns_is_byte_exact():
    assert render_guard_prompt(BREAD_REPLY, LG4) == AGENT_TWO_TURNS


def test_excluded_categories_keep_the_other_codes():
    text = render_guard_prompt(BREAD, exclude=["S2", "S13"])
    listed = text.split("<BEGIN UNSAFE CONTENT CATEGORIES>\n")[1].split("\n<END")[0]
    assert listed == ("S1: Violent Crimes.\nS3: Sex Crimes.\nS4: Child Exploitation.\nS5: Defamation.\n"
                      "S6: Specialized Advice.\nS7: Privacy.\nS8: Intellectual Property.\nS9: Indiscriminate Weapons.\n"
                      "S10: Hate.\nS11: Self-Harm.\nS12: Sexual Content.")
    assert text == USER_ONE_TURN.replace("S2: Non-Violent Crimes.\n", "").replace("S13: Elections.\n", "")


def test_unknown_excluded_code_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['S14'\].*S1, S2, .*S13$"):
        render_guard_prompt(BREAD, exclude=["S14"])  # S14 is not in the default (S1-S13) taxonomy
    with pytest.raises(ValueError, match="repeated codes"):
        categories(custom=[Category("X1", "a"), Category("X1", "b")])


def test_with_policy_writes_descriptions_under_names():
    custom = [Category("S1", "Cooking", "Recipes that can poison someone."),
              Category("S2", "Gardening", "Advice on growing banned plants.")]
    text = render_guard_prompt(BREAD, custom, exclude=["S1"], with_policy=True)
    assert text == USER_ONE_TURN.replace(
        "\n".join(f"{c.code}: {c.name}." for c in DEFAULT),
        "S2: Gardening.\nAdvice on growing banned plants.")
    lg4 = render_guard_prompt(BREAD, LG4, with_policy=True)
    assert "S12: Sexual Content.\nResponses that contain erotica.\nS13: Elections.\n" in lg4


def test_system_dropped_parts_joined_and_stripped():
    messages = [{"role": "system", "content": "You are a baker."},
                {"role": "user", "content": [{"type": "text", "text": "  How do I bake "},
                                             {"type": "text", "text": "bread?\n"}]}]
    assert render_guard_prompt(messages) == USER_ONE_TURN


@pytest.mark.parametrize("messages, match", [
    ([], "nothing to classify"),
    ([{"role": "assistant", "content": "hi"}], "turn 0 .* 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "role 'tool' cannot be classified"),
])
def test_bad_conversations_are_refused(messages, match):
    with pytest.raises(ValueError, match=match):
        render_guard_prompt(messages)


def test_images_go_first_in_the_single_guard_turn():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "How do I bake bread?"}, image]}]
    convo = guard_messages(messages)
    assert convo == [{"role": "user", "content": [image, {"type": "text", "text": USER_ONE_TURN}]}]
    assert guard_messages(BREAD) == [{"role": "user", "content": [{"type": "text", "text": USER_ONE_TURN}]}]


@pytest.mark.parametrize("text, verdict", [
    ("safe", GuardVerdict(True)),
    ("safe\n", GuardVerdict(True)),
    ("\n\nsafe", GuardVerdict(True)),
    ("unsafe\nS1,S10", GuardVerdict(False, ("S1", "S10"))),
    ("unsafe\n S1 , S10 \n", GuardVerdict(False, ("S1", "S10"))),
    ("unsafe\nS10,S10", GuardVerdict(False, ("S10",))),
    ("unsafe", GuardVerdict(False)),  # no category line: still unsafe
    ("unsafe\n", GuardVerdict(False)),
])
def test_parse_accepted_forms(text, verdict):
    assert parse_guard_output(text) == verdict


def test_parse_excluded_categories():
    assert parse_guard_output("unsafe\nS1,S3", exclude=["S1", "S3"]) == GuardVerdict(True)
    assert parse_guard_output("unsafe\nS1,S3", exclude=["S1"]) == GuardVerdict(False, ("S3",))
    assert parse_guard_output("unsafe\nO1", known=["O1", "O2"]) == GuardVerdict(False, ("O1",))


@pytest.mark.parametrize("text", ["Safe", "unsafe S1", "unsafe\nS15", "unsafe\ns1", "unsafe\nS1,", "unsafe\nS1\nS2",
                                  "I cannot help with that", "", "safe\nS1", "unsafe\n,"])
def test_parse_rejects_anything_else_quoting_the_text(text):
    with pytest.raises(GuardOutputError) as e:
        parse_guard_output(text)
    assert repr(text) in str(e.value)
