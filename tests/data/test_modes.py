"""SFT conversation modes and hints over world rows."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from keye.data.conversations import parse_row
from keye.data.modes import CONVERSATION_MODES, assign_modes, extract_answer, render_mode, with_hint
from keye.data.world import SceneConfig, WorldConfig, generate_world
from keye.errors import KeyeInputError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes_world")
    config = WorldConfig(seed=5, scene=SceneConfig(height=32, width=32, durations=(4.0,)), clips={"train": 12, "val": 0, "test": 0})
    generate_world(out, config, progress=False)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    zoom = [json.loads(line) for line in (out / "train_zoom.jsonl").read_text().splitlines()]
    return out, rows, zoom


def test_every_mode_round_trips_to_the_answer(world):
    out, rows, zoom = world
    for row in rows + zoom:
        applicable = {"think_with_image", "video"} if row.get("images") else {"non_thinking", "thinking", "auto_think", "video"}
        for mode in CONVERSATION_MODES:
            if mode not in applicable:
                with pytest.raises(KeyeInputError, match="cannot be rendered"):
                    render_mode(row, mode)
                continue
            rendered = render_mode(row, mode)
            reply = rendered["messages"][-1]["content"]
            assert extract_answer(reply) == row["answer"], (mode, reply)
            conv = parse_row(rendered, "r:1", out)  # rendered rows are ordinary data again
            assert conv.meta["mode"] == mode and conv.turns[-1].text == reply


def test_thinking_styles_follow_the_row(world):
    _, rows, _ = world
    for row in rows:
        assert render_mode(row, "thinking")["messages"][-1]["content"] == f"<think>{row['cot']}</think>{row['answer']}"
        assert render_mode(row, "thinking")["think_mode"] == "think"
        assert render_mode(row, "non_thinking")["think_mode"] == "no_think"
        auto = render_mode(row, "auto_think")
        assert auto["think_mode"] is None
        assert auto["messages"][-1]["content"].startswith("<analysis>")
        assert ("<think>" in auto["messages"][-1]["content"]) == row["reasoning"]
    assert {r["reasoning"] for r in rows} == {True, False}


def test_assign_modes_is_stable_and_follows_weights(world):
    _, rows, zoom = world
    weights = {"non_thinking": 1.0, "thinking": 1.0, "auto_think": 2.0, "think_with_image": 1.0}
    first = assign_modes(rows + zoom, weights, seed=1)
    again = assign_modes(list(reversed(rows + zoom)), weights, seed=1)
    assert {r["id"]: r["mode"] for r in first} == {r["id"]: r["mode"] for r in again}
    counts = Counter(r["mode"] for r in first if not r.get("images"))
    assert counts["auto_think"] > counts["thinking"] and counts["auto_think"] > counts["non_thinking"]
    assert {r["mode"] for r in first if r.get("images")} == {"think_with_image"}
    with pytest.raises(KeyeInputError, match="unknown conversation modes"):
        assign_modes(rows, {"telepathy": 1.0})


def test_frame_listings_render_only_as_written(world):
    """A frames row (a listing, no reference answer) renders only in the video mode, so a stage can mix frame
    listings into QA rows whose answer styles are drawn: they stay listings, never a crash on a missing answer."""
    out, rows, _ = world
    frames = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    for mode in CONVERSATION_MODES:
        if mode != "video":
            with pytest.raises(KeyeInputError, match="cannot be rendered"):
                render_mode(frames[0], mode)
    mixed = assign_modes(rows + frames, {"non_thinking": 1.0, "thinking": 1.0, "video": 0.01}, seed=0)
    assert [r["messages"] for r in mixed if r["mode"] == "video" and "answer" not in r] == [f["messages"] for f in frames]
    assert sum(r["mode"] == "video" for r in mixed) < len(frames) + len(rows) // 20


def test_hints_are_cumulative(world):
    _, rows, _ = world
    row = rows[0]
    assert with_hint(row, 0) is row
    for level in range(1, 6):
        text = with_hint(row, level)["messages"][0]["content"]
        assert text.startswith(row["messages"][0]["content"])
        assert all(h in text for h in row["hints"][:level]) and all(h not in text for h in row["hints"][level:])
    with pytest.raises(KeyeInputError, match="out of range"):
        with_hint(row, 6)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("red", "red"),
        ("<think>x moves</think>left.", "left"),
        ("<analysis>easy</analysis> 3 ", "3"),
        ("<analysis>a</analysis><think>b</think><answer>B</answer>", "B"),
        ("<think>never closed", ""),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer
