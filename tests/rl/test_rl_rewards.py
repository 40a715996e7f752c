"""Reward functions, progressive hint escalation and zero-variance handling, with no model."""

import pytest
import torch

from keye.data.modes import with_hint
from keye.errors import ConfigError
from keye.train.rewards import REWARDS, accuracy_reward, combine_rewards, format_reward, repetition_penalty
from keye.train.stages.rl import Group, Prompt, RLConfig, collect_rollouts, group_advantages, progressive_hints


def test_accuracy_reads_answer_tags_boxed_and_option_letters():
    completions = [
        "<think>two balls, one leaves</think><answer>Red.</answer>",
        "<think>hmm</think>\\boxed{red}",
        "<think>hmm</think>blue",
        "<think>never closed, red",  # an unfinished think block has no answer
        "(B) the blue circle",
        "the blue circle",
        "A",
    ]
    answers = ["red", "red", "red", "red", "B", "B", "B"]
    options = [None] * 4 + [["the red square", "the blue circle"]] * 3
    assert accuracy_reward([""] * 7, completions, answer=answers, options=options) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("text, mode, ok", [
    ("<think>look at frame 2</think>red", "think", True),
    ("<think>look</think>", "think", False),  # no answer after the block
    ("red", "think", False),
    ("<think>a</think><think>b</think>red", "think", False),
    ("<think>a</think>red</think>", "think", False),
    ("red", "no_think", True),
    ("<think>a</think>red", "no_think", False),
    ("", "no_think", False),
    ("<analysis>needs steps</analysis><think>a</think>red", None, True),
    ("<analysis>direct</analysis>red", None, True),
    ("red", None, False),
])
def test_format_reward_follows_the_think_mode(text, mode, ok):
    assert format_reward([""], [text], think_mode=[mode]) == [float(ok)]


def test_repetition_penalty_is_the_share_of_repeated_ngrams():
    loop = "the ball moves " * 4  # 12 words, 10 trigrams, 3 distinct
    assert repetition_penalty([""] * 3, [loop, "a b c d e", "a b"]) == [pytest.approx(-0.7), 0.0, 0.0]


def test_combine_rewards_weights_terms_and_rejects_unknown_names():
    total, terms = combine_rewards({"accuracy": 1.0, "format": 0.5}, ["p", "p"], ["red", "<think>x</think>red"],
                                   {"answer": ["red", "red"], "think_mode": ["think", "think"], "kind": ["c", "c"]})
    assert terms == {"accuracy": [1.0, 1.0], "format": [0.0, 1.0]} and total == [1.0, 1.5]
    with pytest.raises(ConfigError, match="unknown 'acc'"):
        combine_rewards({"acc": 1.0}, ["p"], ["x"], {})
    assert set(REWARDS) >= {"accuracy", "format", "repetition"}


def test_group_advantages_are_normalised_within_the_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (torch.tensor([1.0, 0, 0, 1]).std() + 1e-4))
    assert adv.sum().abs() < 1e-6


# ---------------------------------------------------------------- progressive hints with a fake policy


def _row(rid, solves_at, hints=5):
    return {"id": rid, "answer": "red", "solves_at": solves_at,
            "messages": [{"role": "user", "content": "<video>What colour?"}, {"role": "assistant", "content": "red"}],
            "hints": [f"h{i}" for i in range(1, hints + 1)]}


class FakePolicy:
    """Deterministic: answers a row correctly (1 of G) iff the prompt carries at least ``solves_at`` hints."""

    def __init__(self, G=4):
        self.G, self.calls = G, []

    def __call__(self, rows, level):
        self.calls.append((level, [r["id"] for r in rows]))
        groups = []
        for r in rows:
            shown = r["messages"][0]["content"].count("Hint ")
            assert shown == level  # the hinted prompt really carries the hints of its level
            correct = [shown >= r["solves_at"] and i == 0 for i in range(self.G)]
            rewards = torch.tensor([float(c) for c in correct])
            groups.append(Group(Prompt(r, "", torch.zeros(1, dtype=torch.long), {}), level, [], [""] * self.G,
                                rewards, {"accuracy": rewards.tolist()}, correct, [True] * self.G))
        return groups


def test_progressive_hints_pick_the_lowest_solving_level_and_stop_there():
    rows = [_row("a", 0), _row("b", 2), _row("c", 5), _row("d", 99), _row("e", 3, hints=1)]
    policy = FakePolicy()
    out = progressive_hints(rows, policy(rows, 0), policy, max_level=5)
    assert [g.hint_level for g in out] == [0, 2, 5, 0, 0]
    assert [g.solved for g in out] == [True, True, True, False, False]
    assert out[1].prompt.row["messages"][0]["content"].endswith("Hint 1: h1\nHint 2: h2")
    # each level is one batch of the still-unsolved rows that have that many hints; solved rows stop
    assert policy.calls == [(0, list("abcde")), (1, list("bcde")), (2, list("bcd")), (3, list("cd")), (4, list("cd")), (5, list("cd"))]


def test_progressive_hints_respect_max_level():
    rows = [_row("b", 2)]
    policy = FakePolicy()
    out = progressive_hints(rows, policy(rows, 0), policy, max_level=1)
    assert out[0].hint_level == 0 and [c[0] for c in policy.calls] == [0, 1]


@pytest.mark.parametrize("mode, kept_ids", [("filter", ["a", "b"]), ("keep", ["a", "b", "d"])])
def test_zero_variance_groups_are_filtered_or_kept(mode, kept_ids):
    # "a" is solved unhinted (1 of 4 right), "b" at hint level 2; "d" never: all rewards 0, no variance
    batches = iter([[_row("a", 0), _row("b", 2), _row("d", 99)]])
    cfg = RLConfig(zero_variance=mode)
    cfg.rollout.prompts_per_step = 3
    kept, stats = collect_rollouts(lambda: next(batches), FakePolicy(), cfg)
    assert [g.prompt.row["id"] for g in kept] == kept_ids and stats["prompt_draws"] == 1
    assert [g.hint_level for g in kept] == [0, 2, 0][: len(kept_ids)]
    assert stats["accuracy"] == pytest.approx(1 / 12)  # the policy's own, unhinted: only "a", 1 of 4
    assert stats["zero_variance_dropped"] == (1 if mode == "filter" else 0)


def test_resample_draws_again_until_the_batch_is_full():
    batches = iter([[_row("d", 99), _row("a", 0)], [_row("y", 99), _row("z", 0)], [_row("q", 0), _row("r", 0)]])
    cfg = RLConfig(zero_variance="resample", max_resample=3)
    cfg.rollout.prompts_per_step = 2
    kept, stats = collect_rollouts(lambda: next(batches), FakePolicy(), cfg)
    assert [g.prompt.row["id"] for g in kept] == ["a", "z"]
    assert stats["prompt_draws"] == 2 and stats["zero_variance_dropped"] == 2
    assert stats["hinted_share"] == 0.0 and stats["groups_kept"] == 2


def test_with_hint_row_feeds_reward_columns_unchanged():
    row = with_hint(_row("b", 2), 2)
    assert row["hint_level"] == 2 and row["answer"] == "red"


def test_placement_reward_checks_each_claim_against_the_clips_listing():
    """The world's own reference chains state only true placements (reward 1); a chain with one cell moved
    loses exactly that claim's share; a chain without placements earns nothing."""
    from keye.data.world import WorldConfig
    from keye.data.world.generate import frame_texts, make_clip, questions_for_clip
    from keye.data.world.words import placement_claims
    from keye.train.rewards import placement_reward

    config = WorldConfig(seed=4)
    chains, listings = [], []
    for i in range(30):
        clip, rng = make_clip(config, "train", f"train-{i:05d}")
        for qa in questions_for_clip(config, clip, rng)[0]:
            if qa.kind in ("motion", "mover_color", "mover_count"):
                chains.append(f"<think>{qa.cot}</think>{qa.answer}")
                listings.append([list(p) for p in frame_texts(clip)])
    assert len(chains) >= 10 and all(placement_claims(c) for c in chains)
    assert placement_reward(None, chains, frame_texts=listings) == [1.0] * len(chains)

    chain, listing = chains[0], listings[0]
    claims = placement_claims(chain)
    obj, when, cell = claims[0]
    other = "bottom right" if cell != "bottom right" else "top left"
    moved = chain.replace(f"{obj} is in the {cell}", f"{obj} is in the {other}", 1)
    assert placement_claims(moved)[0] == (obj, when, other)
    assert placement_reward(None, [moved], frame_texts=[listing]) == [pytest.approx(1 - 1 / len(claims))]
    assert placement_reward(None, ["<think>It moves.</think>left"], frame_texts=[listing]) == [0.0]
    with pytest.raises(ConfigError, match="frame_texts"):
        placement_reward(None, [chain])


def test_the_rl_stage_joins_each_rows_listing_for_the_placement_reward(tmp_path):
    import json

    from keye.train.stages.rl import _with_listings

    (tmp_path / "frames.jsonl").write_text(json.dumps({"clip_id": "c1", "frame_texts": [[0.0, "red circle top left"]]}) + "\n")
    rows = [{"id": "q1", "clip_id": "c1", "answer": "red"}]
    joined = _with_listings(rows, ["frames.jsonl"], tmp_path)
    assert joined == [{**rows[0], "frame_texts": [[0.0, "red circle top left"]]}] and "frame_texts" not in rows[0]
    with pytest.raises(ConfigError, match=r"no frame_texts for clip\(s\) \['c2'\]"):
        _with_listings(rows + [{"id": "q2", "clip_id": "c2", "answer": "blue"}], ["frames.jsonl"], tmp_path)
