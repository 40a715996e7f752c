"""Answer parsing on hand-written generations: reasoning split, <answer>, \\boxed{}, letters, option text."""

import pytest

from keye.data.answers import extract_choice, final_answer, is_correct, normalize, option_text, split_reasoning

OPTIONS = ["A. a red ball", "B. a white square", "C. a blue car", "D. nothing moves"]


def test_split_reasoning_keeps_thinking_apart():
    a = split_reasoning("<analysis>Needs two frames.</analysis><think>Scene 1 has 2, scene 2 has 1.</think>3", "auto")
    assert (a.text, a.thinking, a.mode) == ("3", "Needs two frames.\n\nScene 1 has 2, scene 2 has 1.", "auto")
    assert a.raw.endswith("</think>3")
    b = split_reasoning("<think>first I count<answer>x</answer>", "think")  # cut off inside <think>
    assert b.text == "" and b.thinking.startswith("first I count")
    c = split_reasoning("leaves.", "no_think")
    assert (c.text, c.thinking) == ("leaves", "")


@pytest.mark.parametrize("raw, expected", [
    ("<think>hmm</think><answer>circle</answer>", "circle"),
    ("The total is \\boxed{4}.", "4"),
    ("<think>1+3</think>So \\boxed{3} no wait \\boxed{4}", "4"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("  stays. ", "stays"),
])
def test_final_answer(raw, expected):
    assert final_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("B", "B"),
    ("(C)", "C"),
    ("B. a white square", "B"),
    ("D)", "D"),
    ("[A]", "A"),
    ("The answer is C.", "C"),
    ("Option b", None),  # lower-case b is not a letter choice
    ("<think>The square moves, the ball does not.</think><answer>B</answer>", "B"),
    ("\\boxed{D}", "D"),
    ("a white square", "B"),  # option text, article dropped
    ("A white square.", "B"),  # "A" here is the article, not option A
    ("I think it is a blue car that moves", "C"),  # the one option text contained
    ("E", None),  # not among four options
    ("", None),
    ("Either a red ball or a blue car", None),  # two options mentioned: ambiguous
])
def test_extract_choice(raw, expected):
    assert extract_choice(raw, OPTIONS) == expected


def test_extract_choice_prefers_the_longer_contained_option():
    options = ["red", "dark red", "blue"]
    assert extract_choice("It is dark red.", options) == "B"


def test_normalize_and_option_text():
    assert normalize("The Circle.") == normalize("circle") == "circle"
    assert normalize("  Moves   LEFT! ") == "moves left"
    assert option_text("C. Three.") == "Three."
    assert option_text("(B) two") == "two"


def test_is_correct_open_and_multiple_choice():
    assert is_correct("<think>2 + 2</think>The answer: \\boxed{4}", "4")
    assert is_correct("The Circle.", "circle")
    assert not is_correct("<think>unfinished", "circle")
    assert not is_correct("", "")  # an empty answer never scores
    assert is_correct("a white square", "B", OPTIONS) and not is_correct("a white square", "A", OPTIONS)
