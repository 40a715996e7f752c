"""Rewards for the RL stage: plain functions ``f(prompts, completions, **row) -> list[float]``.

The calling convention is TRL's: ``prompts`` and ``completions`` are lists of strings (one entry per
completion, so a prompt's text repeats G times), and every other column of the data rows arrives as a
keyword holding one value per completion (``answer``, ``options``, ``think_mode``, ...). A reward
ignores the columns it does not need (``**_``), so any TRL-style reward function plugs in by
registering it. ``combine_rewards`` weights several of them into one scalar per completion.

Answer reading is ``keye.data.answers`` (reasoning blocks dropped, ``<answer>`` and ``\\boxed{}``
unwrapped, option letters and option text matched), the same code that scores the benchmarks, so
the policy is rewarded for exactly what evaluation counts as correct.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from keye.errors import ConfigError
from keye.data.answers import is_correct
from keye.data.world.words import confirmed_claims
from keye.registry import registrar

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, RewardFn] = {}


register_reward = registrar(REWARDS)


@register_reward("accuracy")
def accuracy_reward(prompts, completions, answer, options=None, **_) -> list[float]:
    """1.0 when the final answer (``<answer>``, ``\\boxed{}``, option letter or text) equals the reference."""
    options = options or [None] * len(completions)
    return [float(is_correct(c, a, o)) for c, a, o in zip(completions, answer, options)]


# Keye-VL-1.5 output shapes: thinking = one closed <think> block then a non-empty answer; no-think = no
# <think> at all; auto-think = an <analysis> verdict first, then either shape.
_THINK = re.compile(r"\s*<think>(?:(?!<think>|</think>).)*</think>\s*(?!.*</?think>)\S.*", re.S)
_NO_THINK = re.compile(r"(?!.*</?(think|analysis)>)\s*\S.*", re.S)
_ANALYSIS = re.compile(r"\s*<analysis>(?:(?!<analysis>|</analysis>).)*</analysis>(.*)", re.S)


def format_ok(completion: str, think_mode: str | None) -> bool:
    """Whether ``completion`` has the shape its think mode asks for ("think", "no_think", None = auto)."""
    if think_mode == "think":
        return bool(_THINK.fullmatch(completion))
    if think_mode == "no_think":
        return bool(_NO_THINK.fullmatch(completion))
    if think_mode is None:
        m = _ANALYSIS.fullmatch(completion)
        return bool(m) and (bool(_THINK.fullmatch(m.group(1))) or bool(_NO_THINK.fullmatch(m.group(1))))
    raise ConfigError(f"think_mode must be 'think', 'no_think' or None, got {think_mode!r}")


@register_reward("format")
def format_reward(prompts, completions, think_mode=None, **_) -> list[float]:
    """1.0 when the completion has its mode's shape (closed <think> block iff thinking)."""
    modes = think_mode or [None] * len(completions)
    return [float(format_ok(c, m)) for c, m in zip(completions, modes)]


@register_reward("repetition")
def repetition_penalty(prompts, completions, ngram: int = 3, **_) -> list[float]:
    """In [-1, 0]: minus the share of repeated word ``ngram``-grams (the TRL / DeepSeek-R1 recipe's
    repetition penalty). Degenerate loops are the classic failure of small policies under RL."""
    out = []
    for text in completions:
        words = text.split()
        grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
        out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out


@register_reward("placement")
def placement_reward(prompts, completions, frame_texts=None, **_) -> list[float]:
    """The share of a completion's placement claims ("the red circle is in the top left at 1.0s") that the
    clip's frame listing confirms (``frame_texts``: [seconds, "red circle top left, ..."] per frame, as the
    world's frames rows hold them); 0 for a completion that claims nothing. It rewards chains that read the
    frames right, where the answer reward only sees the last word."""
    if frame_texts is None:
        raise ConfigError("reward 'placement' needs each row's frame_texts (the RL stage joins data.listings)")
    out = []
    for completion, listing in zip(completions, frame_texts):
        claims, right = confirmed_claims(completion, listing or [])
        out.append(right / claims if claims else 0.0)
    return out


def combine_rewards(
    weights: dict[str, float], prompts: list[str], completions: list[str], columns: dict[str, list]
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the named rewards per completion, and each reward's own values."""
    unknown = set(weights) - set(REWARDS)
    if unknown:
        raise ConfigError(f"rewards: unknown {sorted(unknown)[0]!r}; registered: {sorted(REWARDS)}")
    terms = {}
    for name in weights:
        values = REWARDS[name](prompts, completions, **columns)
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        terms[name] = [float(v) for v in values]
    total = [sum(weights[n] * terms[n][i] for n in weights) for i in range(len(completions))]
    return total, terms
