"""The text stage: the world written as text (listings a test can read back), a short run that learns only
the decoder, and held-out scores on exactly the questions of the world's val / test files."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from keye.data.world import WorldConfig, generate_world
from keye.data.world.generate import frame_objects
from keye.data.world.text import listing, pretraining_clip
from keye.errors import ConfigError
from keye.recipe import load_stage_config, run_stage
from keye.train.metrics import read_metrics
from keye.train.optim import group_of


def test_the_listing_holds_every_frame_object_and_cut():
    config = WorldConfig(seed=5)
    for index in range(12):
        clip, _ = pretraining_clip(index, config)
        lines = listing(clip).splitlines()
        frames = list(frame_objects(clip))
        assert len(lines) == len(frames)
        for line, (seconds, seen) in zip(lines, frames):
            head, objects = line.split(": ", 1)
            assert head.startswith(f"{seconds:.1f}s ")
            entries = [] if objects == "nothing" else objects.split(", ")
            assert [" ".join(e.split()[:2]) for e in entries] == [obj.name for _, _, obj in seen]
            for entry, (x, y, _) in zip(entries, seen):
                gx, gy = (int(v) for v in entry.split()[2:])
                assert 1 <= gx <= 99 and 1 <= gy <= 99
                assert abs(gx - x * 99 / clip.width) <= 1.5 and abs(gy - y * 99 / clip.height) <= 1.5
        backgrounds = [line.split(":")[0].split(" ", 1)[1] for line in lines]
        changes = sum(a != b for a, b in zip(backgrounds, backgrounds[1:]))
        assert changes == len(clip.shots) - 1  # every cut shows as a background change, and nothing else does


def test_the_text_stage_refuses_the_held_out_world_data_files_shares_over_1_and_clashing_guides(tmp_path):
    stage = tmp_path / "text.yaml"
    stage.write_text("stage: text\nworld: {seed: 0}\n")
    with pytest.raises(ConfigError, match="world.seed: 0 is the held-out world"):
        load_stage_config(stage)
    stage.write_text("stage: text\ndata: {train: [world/train.jsonl]}\n")
    with pytest.raises(ConfigError, match="data.train: the text stage reads no files"):
        load_stage_config(stage)
    stage.write_text("stage: text\nmix: {lookups: 0.5, motions: 0.6}\n")
    with pytest.raises(ConfigError, match=r"mix.lookups \+ mix.motions: 0.5 \+ 0.6 is over 1"):
        load_stage_config(stage)
    stage.write_text("stage: text\nguide: {mentions: 1.0, mention_layer: 1, mention_heads: [0, 1], order: 1.0, "
                     "order_layer: 1, order_head: 1}\n")
    with pytest.raises(ConfigError, match="guide.order_head: head 1 of layer 1 is shaped by another guide term"):
        load_stage_config(stage)
    stage.write_text("stage: text\nguide: {mention_kinds: [motion, colour]}\n")
    with pytest.raises(ConfigError, match=r"guide.mention_kinds: \['colour'\] unknown"):
        load_stage_config(stage)


def test_a_short_text_run_trains_the_decoder_only_and_scores_the_held_out_questions(tmp_path):
    stage = tmp_path / "text.yaml"
    stage.write_text(yaml.safe_dump({
        "stage": "text", "eval_clips": {"val": 1, "test": 2}, "eval_lookups": 10,
        "run": {"steps": 8, "micro_batch": 4, "eval_every": 4,
                "optim": {"lr": 3.0e-3, "warmup_steps": 0, "schedule": "constant"}},
    }))
    cfg = load_stage_config(stage)
    root = tmp_path / "run"
    torch.manual_seed(0)
    from keye.models import build_model

    start = build_model("keye-nano").state_dict()  # what load_start builds: the variant seeded with run.seed
    run_stage(cfg, root)
    losses = [r["loss"] for r in read_metrics(root / "text" / "metrics.jsonl") if "loss" in r]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    from transformers import AutoModelForImageTextToText

    after = AutoModelForImageTextToText.from_pretrained(root / "text" / "model").state_dict()
    changed = {group_of(k) for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"lm"}

    # the text oracle scores exactly the questions of seed 0's val / test files (generated here to compare)
    generate_world(tmp_path / "world0", WorldConfig(seed=0, clips={"train": 0, "val": 1, "test": 2}), progress=False)
    rows = [json.loads(line) for split in ("val", "test")
            for line in (tmp_path / "world0" / f"{split}.jsonl").read_text().splitlines()]
    scores = json.loads((root / "text" / "eval.json").read_text())
    assert scores["text_oracle"]["n"] == len(rows)
    assert set(scores["text_oracle"]["per_kind"]) == {r["kind"] for r in rows}
    assert scores["lookup"]["n"] == 10 and 0 < scores["lookup"]["first_listed"] < 1

    # run.eval_every: the same figures on the way, the last of them those of the final weights
    curve = [r for r in read_metrics(root / "text" / "metrics.jsonl") if "eval_text_oracle" in r]
    assert [r["step"] for r in curve] == [4, 8]
    assert curve[-1]["eval_text_oracle"] == scores["text_oracle"]["accuracy"]
    assert curve[-1]["eval_lookup"] == scores["lookup"]["accuracy"]
    per_kind = scores["text_oracle"]["per_kind"]
    assert {k: curve[-1][f"eval_text_oracle/{k}"] for k in per_kind} == per_kind


class _NextTokenOracle(torch.nn.Module):
    """Predicts every next token right, except that where a motion question's answer starts it prefers
    ``<think>``, with the answer's first token second."""

    def __init__(self, vocab: int, think: int, header: list[int], motion_word: int):
        super().__init__()
        self.vocab, self.think, self.header, self.motion_word = vocab, think, header, motion_word
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids, attention_mask):
        B, L = input_ids.shape
        logits_BLV = torch.zeros(B, L, self.vocab)
        logits_BLV[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
        n = len(self.header)
        for b in range(B):
            ids = input_ids[b].tolist()
            if self.motion_word in ids:
                starts = [t for t in range(n - 1, L) if ids[t - n + 1: t + 1] == self.header]
                logits_BLV[b, starts[-1], self.think] = 2.0
        return SimpleNamespace(logits=logits_BLV)


def test_the_text_oracle_tells_a_chain_opened_from_a_wrong_answer():
    from keye.processing import load_nano_processor
    from keye.train.stages.text import text_oracle

    processor = load_nano_processor()
    tok = processor.tokenizer
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    model = _NextTokenOracle(len(tok), tok.convert_tokens_to_ids("<think>"), header,
                             tok(" way", add_special_tokens=False)["input_ids"][0])
    scores = text_oracle(model, processor, {"val": 2, "test": 2})
    kinds = scores["per_kind"]
    assert "motion" in kinds and len(kinds) > 1
    for kind in kinds:
        motion = kind == "motion"
        assert kinds[kind] == (0.0 if motion else 1.0)
        assert scores["direct"]["per_kind"][kind] == 1.0
        assert scores["opens_chain"]["per_kind"][kind] == (1.0 if motion else 0.0)
    assert scores["direct"]["accuracy"] == 1.0 and scores["accuracy"] == 1 - scores["opens_chain"]["share"]


def test_guides_point_at_the_answer_and_its_questions_key_words():
    import re

    from keye.data.world.text import LISTING_INTRO, TextMix, key_words
    from keye.processing import load_nano_processor
    from keye.train.stages.text import WorldTextDataset

    processor = load_nano_processor()
    tok = processor.tokenizer
    dataset = WorldTextDataset(40, WorldConfig(seed=7), TextMix(lookups=0.4, motions=0.3), processor, "all")
    checked, mentions, kinds = 0, 0, set()
    for i in range(16):
        ids = dataset[i].input_ids.tolist()
        text = tok.decode(ids)
        # every whole clip is asked its cuts; a lookup only colours and shapes
        kinds.add("clip" if "scene cuts" in text else "motion" if "Which way does" in text else "lookup")
        for pos, keys in dataset[i].meta["guides"]:  # an answer, and its question's key words
            assert tok.decode(ids[: pos + 1]).endswith("<|im_start|>assistant\n")  # the answer comes next
            user = tok.decode(ids[:pos]).rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
            question = "\n".join(line for line in user.splitlines()
                                 if line != LISTING_INTRO and not re.match(r"\d+\.\ds ", line))
            assert [tok.decode(ids[k]).strip() for k in keys] == key_words(question), (user, question)
            checked += 1
        for pos, first, last in dataset[i].meta["mentions"]:  # a motion answer, and its object's two reads
            assert tok.decode(ids[: pos + 1]).endswith("<|im_start|>assistant\n")
            name = re.search(r"Which way does the (\w+ \w+) move[^\n]*<\|im_end\|>\n<\|im_start\|>assistant\n$",
                             tok.decode(ids[: pos + 1])).group(1)
            seen = re.findall(rf"{name} (\d+) (\d+)", tok.decode(ids[:pos]))
            assert [tok.decode(ids[k]).strip() for k in first] == list(seen[0])
            assert [tok.decode(ids[k]).strip() for k in last] == list(seen[-1]) and len(seen) >= 2
            mentions += 1
    assert checked > 20 and mentions > 5 and kinds == {"motion", "lookup", "clip"}, (kinds, mentions)


def test_order_and_entry_guides_point_at_the_reads_their_answers_turn_on():
    """An order answer's target is the name, where first listed, of the option the listing names first, and
    that option is the world's answer; entry answers get their object's first and last listed x and y once
    ``mention_kinds`` names them, and only then."""
    import re

    from keye.data.world.text import TextMix
    from keye.processing import load_nano_processor
    from keye.train.stages.text import WorldTextDataset

    processor = load_nano_processor()
    tok = processor.tokenizer
    dataset = WorldTextDataset(60, WorldConfig(seed=7), TextMix(), processor, "all", ("motion", "entry"))
    orders, entries = 0, 0
    for i in range(40):
        sample = dataset[i]
        ids = sample.input_ids.tolist()
        for pos, targets in sample.meta["orders"]:
            before = tok.decode(ids[: pos + 1])
            options = re.search(r"A\. the (\w+ \w+)\nB\. the (\w+ \w+)<\|im_end\|>\n<\|im_start\|>assistant\n$", before)
            firsts = [before.index(f"{name} ") for name in options.groups()]  # the listing opens the text
            listed_first = options.group(1 + int(firsts[1] < firsts[0]))
            assert " ".join(tok.decode(ids[k]).strip() for k in targets) == listed_first
            assert targets[0] == len(tok(before[: min(firsts)].rstrip(), add_special_tokens=False)["input_ids"])
            assert tok.decode(ids[pos + 1]) == "AB"[int(firsts[1] < firsts[0])]  # the world's answer agrees
            orders += 1
        for pos, first, last in sample.meta["mentions"]:
            asked = re.search(r"Does the (\w+ \w+) enter the frame[^\n]*<\|im_end\|>\n<\|im_start\|>assistant\n$",
                              tok.decode(ids[: pos + 1]))
            if asked:
                seen = re.findall(rf"{asked.group(1)} (\d+) (\d+)", tok.decode(ids[:pos]))
                assert [tok.decode(ids[k]).strip() for k in first] == list(seen[0])
                assert [tok.decode(ids[k]).strip() for k in last] == list(seen[-1])
                entries += 1
    assert orders > 5 and entries > 5, (orders, entries)
    motion_only = WorldTextDataset(60, WorldConfig(seed=7), TextMix(), processor, "all")
    assert sum(len(motion_only[i].meta["mentions"]) for i in range(40)) < sum(
        len(dataset[i].meta["mentions"]) for i in range(40))


def test_the_answer_term_is_the_mean_cross_entropy_of_the_assistant_tokens():
    """text_loss's answer term equals a direct cross-entropy over the assistant tokens' logits, and its
    summed loss equals the plain LM loss of the same batch."""
    import functools

    from keye.data.world.text import TextMix
    from keye.models import build_model
    from keye.processing import load_nano_processor
    from keye.train.stages.lm import lm_loss_fn
    from keye.train.stages.text import WorldTextDataset, collate_guided, text_loss

    processor = load_nano_processor()
    dataset = WorldTextDataset(8, WorldConfig(seed=9), TextMix(lookups=0.5), processor, "all")
    collate = functools.partial(collate_guided, pad_id=processor.tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = build_model("keye-nano").eval()
    batch = collate([dataset[i] for i in range(3)])
    answers_BL = batch["answer_labels"].clone()
    out = text_loss(model, dict(batch), answer_weight=2.0)
    plain = lm_loss_fn(model, {k: v for k, v in batch.items() if k not in ("guides", "answer_labels")})
    torch.testing.assert_close(out.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    picked = answers_BL[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(logits[picked], answers_BL[:, 1:][picked])
    assert out.metrics["answer_loss"] == pytest.approx(float(expected.detach()), rel=1e-4)
    assert 0 < int(picked.sum()) < int((batch["labels"] != -100).sum()) // 5  # answers are a small share


def test_guidance_shapes_its_two_heads_and_the_saved_model_keeps_sdpa(tmp_path):
    stage = tmp_path / "text.yaml"
    stage.write_text(yaml.safe_dump({
        "stage": "text", "eval_clips": {"val": 1}, "eval_lookups": 4, "mix": {"lookups": 1.0},
        "guide": {"previous_token": 1.0, "key_words": 1.0}, "answer_weight": 1.0,
        "run": {"steps": 12, "micro_batch": 4, "optim": {"lr": 1.0e-2, "warmup_steps": 0, "schedule": "constant"}},
    }))
    root = tmp_path / "run"
    run_stage(load_stage_config(stage), root)
    rows = read_metrics(root / "text" / "metrics.jsonl")
    assert rows[-1]["guide_previous"] < 0.5 * rows[0]["guide_previous"]  # the previous-token head forms
    assert rows[-1]["guide_keys"] < rows[0]["guide_keys"]
    assert rows[-1]["answer_loss"] < rows[0]["answer_loss"]
    config = json.loads((root / "text" / "model" / "config.json").read_text())
    assert config["text_config"].get("_attn_implementation", "sdpa") != "eager"


def test_the_tap_gives_eager_attentions_weights_and_leaves_the_kernel_alone():
    """AttentionTap's weights for two heads of a padded batch equal what eager attention returns for them,
    its guidance losses (three layers' taps: previous token and key words on one, motion mentions on another,
    the order read on a third)
    and their gradients equal those read off eager weights, the tapped model's logits
    equal the untapped model's, and removing the tap restores the layer's config."""
    import copy
    import functools

    from keye.data.world.text import TextMix
    from keye.models import build_model
    from keye.processing import load_nano_processor
    from keye.train.attention import AttentionTap
    from keye.train.stages.text import GuideConfig, WorldTextDataset, collate_guided, text_loss

    processor = load_nano_processor()
    dataset = WorldTextDataset(8, WorldConfig(seed=9), TextMix(lookups=0.4, cells=0.5, motions=0.3), processor, "all")
    batch = functools.partial(collate_guided, pad_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert not bool(batch["attention_mask"].all()) and batch["mentions"] and batch["orders"]  # padded rows, both reads
    torch.manual_seed(0)
    model = build_model("keye-nano").eval()
    guide = GuideConfig(previous_token=1.0, key_words=1.0, layer=1, heads=(2, 3), mentions=1.0, mention_layer=2,
                        mention_heads=(1, 0), order=1.0, order_layer=3, order_head=1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    plain_logits = model(**inputs).logits

    eager = copy.deepcopy(model)
    eager.model.config._attn_implementation = "eager"
    kept = {}
    eager.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: kept.update(w=out[1]))
    eager.model.layers[2].self_attn.register_forward_hook(lambda m, a, out: kept.update(w2=out[1]))
    eager.model.layers[3].self_attn.register_forward_hook(lambda m, a, out: kept.update(w3=out[1]))
    eager_logits = eager(**inputs).logits
    mask_BL = batch["attention_mask"].bool()
    w_BHLL = kept["w"]
    prev = -torch.diagonal(w_BHLL[:, 2], offset=-1, dim1=-2, dim2=-1).clamp_min(1e-6).log()[mask_BL[:, 1:]].mean()
    keys = -torch.stack([w_BHLL[b, 3, pos, k].sum().clamp_min(1e-6).log() for b, pos, k in batch["guides"]]).mean()
    w2_BHLL = kept["w2"]
    mentions = -torch.stack([w2_BHLL[b, h, pos, t].sum().clamp_min(1e-6).log() for b, pos, first, last in batch["mentions"]
                             for h, t in ((1, first), (0, last))]).mean()
    order = -torch.stack([kept["w3"][b, 1, pos, t].sum().clamp_min(1e-6).log() for b, pos, t in batch["orders"]]).mean()
    (prev + keys + mentions + order).backward(retain_graph=True)

    config = model.model.layers[1].self_attn.config
    tap, tap2, tap3 = (AttentionTap(model.model.layers[layer]) for layer in (1, 2, 3))
    out = text_loss(model, dict(batch), guide=guide, taps={1: tap, 2: tap2, 3: tap3})
    assert out.metrics["guide_previous"] == pytest.approx(float(prev.detach()), rel=1e-4)
    assert out.metrics["guide_keys"] == pytest.approx(float(keys.detach()), rel=1e-4)
    assert out.metrics["guide_mentions"] == pytest.approx(float(mentions.detach()), rel=1e-4)
    assert out.metrics["guide_order"] == pytest.approx(float(order.detach()), rel=1e-4)
    tapped_logits = model(**inputs).logits
    log_prev = tap.log_attention(2, mask_BL)
    real = mask_BL[:, :, None] & mask_BL[:, None, :]  # padding rows and keys differ by design
    torch.testing.assert_close(log_prev.exp() * real, w_BHLL[:, 2].float() * real, atol=1e-5, rtol=1e-4)
    b, pos = (torch.tensor([g[i] for g in batch["guides"]]) for i in (0, 1))
    torch.testing.assert_close(tap.log_attention(3, mask_BL, rows=(b, pos)).exp(), w_BHLL[b, 3, pos].float(),
                               atol=1e-5, rtol=1e-4)
    out.aux_loss.backward()  # the guidance terms, and the MoE router terms the reference adds below
    eager_out = eager(**inputs, labels=batch["input_ids"])
    (eager_out.loss - eager_out.lm_loss).backward()
    for layer in (1, 2, 3):
        for name in ("q_proj", "k_proj"):
            grad = getattr(model.model.layers[layer].self_attn, name).weight.grad
            torch.testing.assert_close(grad, getattr(eager.model.layers[layer].self_attn, name).weight.grad,
                                       atol=1e-5, rtol=1e-3)
            assert grad.abs().sum() > 0
    for t in (tap, tap2, tap3):
        t.remove()
    assert model.model.layers[1].self_attn.config is config and config._attn_implementation != "eager"
    torch.testing.assert_close(tapped_logits[mask_BL], plain_logits[mask_BL], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager_logits[mask_BL], plain_logits[mask_BL], atol=1e-4, rtol=1e-4)


def test_cell_word_lookups_are_answerable_from_what_they_write():
    """With cells=1 every lookup is written in the frame listings' cell words: the frames rows' layout, or for
    one frame the lookup probe's (objects, then the question on the same line); each answer is the one object
    the written window names with the asked shape (or colour)."""
    import re

    from keye.data.world.scene import COLORS, SHAPES
    from keye.data.world.text import lookup_turns, messages

    config, layouts = WorldConfig(seed=11), {"frames": 0, "probe": 0}
    entry = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) (top|middle|bottom) (left|centre|right)\b")
    for index in range(60):
        clip, rng = pretraining_clip(index, config)
        turns = lookup_turns(clip, rng, cells=1.0)
        if not turns:
            continue
        first = messages(turns)[0]["content"]
        if turns[0].separator == ". ":
            layouts["probe"] += 1
            assert first == f"{turns[0].context}. {turns[0].question}" and "s: " not in first
        else:
            layouts["frames"] += 1
            assert re.fullmatch(r"(\d+\.\ds: [^.]+\. ?)+", turns[0].context)
        objects = {(m.group(1), m.group(2)) for m in entry.finditer(turns[0].context)}
        assert objects and "grid" not in first
        for turn in turns:
            asked = re.match(r"What (colour is the (\w+)|shape is the (\w+) object)\?", turn.question)
            if asked.group(2):
                assert [c for c, s in objects if s == asked.group(2)] == [turn.answer]
            else:
                assert [s for c, s in objects if c == asked.group(3)] == [turn.answer]
    assert min(layouts.values()) >= 5, layouts


def test_motion_windows_are_answerable_from_what_they_write():
    """Each motion question's answer is what the written frames show: the asked object's first and last
    listed positions differ along the axis of its direction (y grows downwards), or not at all for "still";
    the frames are one shot's (one background), two or more of them, and every asked object is listed twice."""
    import re

    from keye.data.world.text import motion_turns

    config, answers, asked = WorldConfig(seed=12), set(), 0
    step = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1), "still": (0, 0)}
    for index in range(80):
        clip, rng = pretraining_clip(index, config)
        turns = motion_turns(clip, rng)
        if not turns:
            continue
        lines = turns[0].context.splitlines()[1:]
        assert len(lines) >= 2 and len({line.split(":")[0].split(" ", 1)[1] for line in lines}) == 1
        for turn in turns:
            name = re.match(r"Which way does the (\w+ \w+) move: ", turn.question).group(1)
            seen = [tuple(int(v) for v in m.groups()) for line in lines for m in [re.search(rf"{name} (\d+) (\d+)", line)] if m]
            assert len(seen) >= 2, (name, lines)
            (x0, y0), (x1, y1) = seen[0], seen[-1]
            sx, sy = step[turn.answer]
            if turn.answer == "still":
                assert abs(x1 - x0) <= 1 and abs(y1 - y0) <= 1, (turn.answer, seen)
            else:
                moved, other = (x1 - x0, y1 - y0) if sx else (y1 - y0, x1 - x0)
                assert moved * (sx or sy) > 1 and abs(other) <= 1, (turn.answer, seen)
            answers.add(turn.answer)
            asked += 1
    assert asked >= 60 and answers == set(step), (asked, answers)


def test_a_detached_tap_trains_only_its_layers_queries_and_keys():
    """``AttentionTap(detach_input=True)`` gives the weights the plain tap gives, and a loss on them reaches
    the tapped layer's query and key projections only: no gradient to the layers below, the embeddings or the
    layer's values; removing it leaves the layer's forward as it was."""
    import functools

    from keye.data.world.text import TextMix
    from keye.models import build_model
    from keye.processing import load_nano_processor
    from keye.train.attention import AttentionTap, attention_on
    from keye.train.stages.text import WorldTextDataset, collate_guided

    processor = load_nano_processor()
    dataset = WorldTextDataset(4, WorldConfig(seed=9), TextMix(lookups=0.5), processor, "all")
    batch = functools.partial(collate_guided, pad_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert not bool(batch["attention_mask"].all()) and batch["guides"]
    torch.manual_seed(0)
    model = build_model("keye-nano").eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    mask_BL = batch["attention_mask"].bool()
    plain_logits = model(**inputs).logits.detach()

    def guided(detach: bool):
        model.zero_grad()
        tap = AttentionTap(model.model.layers[2], detach_input=detach)
        logits = model(**inputs).logits
        value = attention_on(tap, 1, mask_BL, batch["guides"])
        value.backward()
        grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
        log_BLL = tap.log_attention(1, mask_BL).detach()
        tap.remove()
        return logits.detach(), float(value.detach()), log_BLL, grads

    logits, value, log_BLL, grads = guided(detach=False)
    d_logits, d_value, d_log_BLL, d_grads = guided(detach=True)
    torch.testing.assert_close(d_logits, plain_logits)
    assert d_value == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(d_log_BLL, log_BLL)
    attn = "model.layers.2.self_attn."
    for name in ("q_proj.weight", "k_proj.weight"):  # the same gradient as the plain tap's, where both reach
        torch.testing.assert_close(d_grads[attn + name], grads[attn + name], atol=1e-6, rtol=1e-4)
        assert d_grads[attn + name].abs().sum() > 0
    below = [n for n in grads if n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))]
    assert grads["model.layers.1.self_attn.q_proj.weight"].abs().sum() > 0  # the plain tap's loss reaches below
    for name in below + [attn + "v_proj.weight", attn + "o_proj.weight"]:
        assert d_grads[name] is None or not d_grads[name].any(), name
    torch.testing.assert_close(model(**inputs).logits.detach(), plain_logits)
