"""Per-frame perception: how many words of a clip's frame listing a model gets right, teacher-forced.

The world's frames task ("List the objects in each frame and where they are." -> "0.0s: red circle top left,
blue square middle centre. 0.5s: ...") names, per 2 fps frame, every object's colour, shape and 3x3 cell.
Given the video and the reference listing up to each word, the model's argmax must be that word; the score
is the share of content words right (colours, shapes, the cell's row and column words, "nothing", and
each frame's background where the world's listings name it: ``listing_backgrounds``), overall and per
word type. Timestamps and punctuation are given away by the format and not scored. A chain of
reasoning over several frames is only as right as these words, so this is the ceiling the video questions
sit under.

Most of a listing's words repeat the frame before, so the decoder can copy them without looking. The score
is therefore also split by mention: a word of an object's ``first`` listed frame (it was not listed in the
frame before), a word the ``same`` as that object's in the frame before, or one that ``changed`` since (its
row or column after a move; a background is ``first`` at a clip's start and after a cut). The ``first``
words are the ones only the frame can give.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keye.data.collate import SampleBuilder, collate
from keye.data.modes import render_mode
from keye.data.world import WorldConfig
from keye.data.world.generate import frame_objects, frames_row, make_clip
from keye.data.world.scene import COLORS, MOTIONS, SHAPES, moved
from keye.data.world.words import MENTIONS, listing_mentions, scored_words
from keye.errors import KeyeInputError
from keye.eval.formats import read_rows
from keye.processing import patchify
from keye.video import VideoOptions


@torch.no_grad()
def listing_word_accuracy(model: nn.Module, processor, world_dir: str | Path, split: str = "val",
                          video: VideoOptions = VideoOptions(), limit: int | None = None,
                          batch_size: int = 8) -> dict[str, Any]:
    """Teacher-forced word accuracy of the frame listings of ``split``'s clips of the world in
    ``world_dir`` (rebuilt from its ``world.json``; the split's videos must be there). ``video``: the
    sampling the model was trained with. Returns {"accuracy", "words", "per_type": {type: accuracy},
    "by_mention": {type: {mention: accuracy}}, "mention_words": {mention: count}} (mentions: module docstring)."""
    world_dir = Path(world_dir)
    config = WorldConfig.from_dict(json.loads((world_dir / "world.json").read_text())["config"])
    clips = [make_clip(config, split, f"{split}-{i:05d}")[0] for i in range(config.clips.get(split, 0))][:limit]
    named = config.listing_backgrounds  # the listings name each frame's background, scored as words too
    rows = [frames_row(clip, named) for clip in clips]
    mentions = [listing_mentions(row["frame_texts"], row["frame_backgrounds"] if named else None) for row in rows]
    return _word_accuracy(model, processor, world_dir, rows, video, batch_size, mentions=mentions)


@torch.no_grad()
def chain_word_accuracy(model: nn.Module, processor, world_dir: str | Path, split: str = "test",
                        video: VideoOptions = VideoOptions(), limit: int | None = None,
                        batch_size: int = 8) -> dict[str, Any]:
    """The same score over the reference chains of thought of ``split``'s reasoning questions, rendered in
    thinking mode as SFT trains them ("<think>The red circle is in the top left at 0.0s and ...</think>2"):
    the chain's colour, shape and position words, not the answer after it. Set beside
    ``listing_word_accuracy`` it tells whether a model reads the frames as well inside a chain."""
    world_dir = Path(world_dir)
    rows = [render_mode(r, "thinking") for r in read_rows(world_dir / f"{split}.jsonl")
            if r.get("reasoning") and r.get("cot")][:limit]
    end_think = processor.tokenizer.convert_tokens_to_ids("</think>")
    return _word_accuracy(model, processor, world_dir, rows, video, batch_size, stop_at=end_think)


def _word_accuracy(model: nn.Module, processor, world_dir: Path, rows: list[dict], video: VideoOptions,
                   batch_size: int, stop_at: int | None = None, mentions: list[list[str | None]] | None = None
                   ) -> dict[str, Any]:
    """Teacher-forced share of the scored words (``word_type``) of the rows' assistant turns that the model's
    argmax gets right; with ``stop_at``, only the words before that token. ``mentions``: per row, a label for
    each of its scored words in order, adding ``by_mention`` ({type: {label: accuracy}}) and ``mention_words``
    ({label: count}) to the result."""
    builder = SampleBuilder(processor, video, base_dir=world_dir)
    tokenizer, device = processor.tokenizer, next(model.parameters()).device
    was_training = model.training
    model.eval()
    right: dict[str, list[bool]] = collections.defaultdict(list)
    by_mention: dict[tuple[str, str], list[bool]] = collections.defaultdict(list)
    for start in range(0, len(rows), batch_size):
        samples = [builder(row) for row in rows[start:start + batch_size]]
        batch = collate(samples, pad_id=tokenizer.pad_token_id)
        labels_BL = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        predicted_BL = logits.argmax(-1).cpu()
        for b in range(len(samples)):
            stops = (labels_BL[b] == stop_at).nonzero().flatten().tolist() if stop_at is not None else []
            end = stops[0] if stops else labels_BL.shape[1]
            scored = []  # (type, right) per scored word, in order
            for positions, kind in scored_words(tokenizer, labels_BL[b, :end]):  # position t predicts t + 1
                ok = all(int(predicted_BL[b, p - 1]) == int(labels_BL[b, p]) for p in positions)
                right[kind].append(ok)
                scored.append((kind, ok))
            if mentions is not None:
                labels = mentions[start + b]
                if len(labels) != len(scored):
                    raise ValueError(f"row {rows[start + b].get('id')}: {len(scored)} scored words, "
                                     f"{len(labels)} mention labels")
                for (kind, ok), label in zip(scored, labels):
                    if label is not None:
                        by_mention[kind, label].append(ok)
    model.train(was_training)
    every = [r for rs in right.values() for r in rs]
    out = {"accuracy": sum(every) / max(len(every), 1), "words": len(every),
           "per_type": {k: sum(v) / len(v) for k, v in sorted(right.items())}}
    if mentions is not None:
        kinds = sorted({kind for kind, _ in by_mention})
        out["by_mention"] = {kind: {label: sum(v) / len(v) for label in MENTIONS if (v := by_mention.get((kind, label)))}
                             for kind in kinds}
        out["mention_words"] = {label: sum(len(by_mention.get((kind, label), [])) for kind in kinds)
                                for label in MENTIONS}
    return out


# ----------------------------------------------------------------------------- what the visual tokens carry


TOKEN_READS = ("colour", "shape", "row", "column", "motion")


@torch.no_grad()
def token_readout(model: nn.Module, processor, world_dir: str | Path, split: str = "val", train_clips: int = 200,
                  video: VideoOptions = VideoOptions(), limit: int | None = None) -> dict[str, Any]:
    """How well a linear read of the visual tokens (the projector's output, what the decoder receives) names
    what the frame shows: each listed object's colour and shape from the token under its centre, each
    token's own row and column in its frame's token grid, and which way each object moved since the frame
    before (``motion``: left, right, up, down or still, where the frame before, in the same shot, lists it;
    one frame cannot show it, so without ``frame_difference`` this read has only where objects sit to go
    on). A discrete-mode model is read on its codes, one-hot (N codebooks x K codes): any linear read of the
    summed code embeddings the decoder receives is one of them, so this bounds it. Fitted on ``train_clips``
    train clips of the world in ``world_dir`` (their videos must be there), scored on ``split``'s clips (the
    first ``limit``).

    The listing score (``listing_word_accuracy``) also counts what the decoder copies from the frame before;
    this one says what the tokens themselves hold. Returns {"per_kind": {kind: accuracy}, "majority": {kind:
    the most common answer's share}, "objects", "tokens"} on the scored clips."""
    world_dir = Path(world_dir)
    config = WorldConfig.from_dict(json.loads((world_dir / "world.json").read_text())["config"])
    if not 0 < train_clips <= config.clips.get("train", 0):
        raise KeyeInputError(f"{world_dir}: the linear read is fitted on {train_clips} train clips; the world has "
                             f"{config.clips.get('train', 0)}")
    builder = SampleBuilder(processor, video, base_dir=world_dir)
    was_training = model.training
    model.eval()
    fit = _token_table(model, builder, config, "train", range(train_clips))
    score = _token_table(model, builder, config, split, range(min(config.clips.get(split, 0), limit or 10**9)))
    model.train(was_training)
    out: dict[str, Any] = {"per_kind": {}, "majority": {}, "objects": len(score["colour"][1]),
                           "tokens": len(score["row"][1]), "moves": len(score["motion"][1])}
    for kind in TOKEN_READS:
        (x_fit, y_fit), (x_score, y_score) = fit[kind], score[kind]
        if not len(y_fit) or not len(y_score):  # a world where nothing is seen twice in a shot: no moves
            continue
        out["per_kind"][kind] = float((_linear_fit(x_fit, y_fit)(x_score) == y_score).float().mean())
        out["majority"][kind] = float(y_score.bincount().max() / len(y_score))
    return out


def _token_table(model: nn.Module, builder: SampleBuilder, config: WorldConfig, split: str, indices
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per kind, (features (N, D), labels (N,)) over the listed frames of ``split``'s clips ``indices``."""
    device = next(model.parameters()).device
    rows: dict[str, tuple[list, list]] = {k: ([], []) for k in TOKEN_READS}  # (x, y)
    for i in indices:
        clip = make_clip(config, split, f"{split}-{i:05d}")[0]
        messages, _ = builder.messages(frames_row(clip))
        decoded = builder.vision(messages).videos[0]
        seconds = torch.as_tensor(decoded.timestamps, dtype=torch.float64)
        listed = list(frame_objects(clip))
        picks = [int((seconds - t).abs().argmin()) for t, _ in listed]
        patched = {j: patchify(decoded.frames[j]) for j in {*picks, *(j - 1 for j in picks if j > 0)}}  # once each
        patches, grids = zip(*(patched[j] for j in picks))
        before = [patched[j - 1][0] if j > 0 else own for j, own in zip(picks, patches)]
        previous = torch.cat([b if b.shape == own.shape else own for b, own in zip(before, patches)])
        grid_N3 = torch.tensor(grids)
        merge = model.config.projector_config.merge_size
        tokens = _visual_tokens(model, torch.cat(patches).to(device), grid_N3.to(device), previous.to(device)).cpu()
        last: dict[int, tuple[float, float]] = {}  # the frame before's objects, id -> centre, in this frame's shot
        last_shot = -1
        for (t, seen), frame_tokens in zip(listed, tokens.split((grid_N3.prod(-1) // merge**2).tolist())):
            shot = clip.shot_of(int(round(t * clip.fps)))
            last = last if shot == last_shot else {}
            h, w = int(grid_N3[0, 1]) // merge, int(grid_N3[0, 2]) // merge
            rows["row"][0].append(frame_tokens)
            rows["row"][1].extend(k // w for k in range(h * w))
            rows["column"][0].append(frame_tokens)
            rows["column"][1].extend(k % w for k in range(h * w))
            for x, y, obj in seen:
                k = min(h - 1, int(y / clip.height * h)) * w + min(w - 1, int(x / clip.width * w))
                labels = [("colour", list(COLORS).index(obj.color)), ("shape", SHAPES.index(obj.shape))]
                if id(obj) in last:
                    dx, dy = x - last[id(obj)][0], y - last[id(obj)][1]
                    labels.append(("motion", MOTIONS.index(moved(dx, dy, still=0.5))))  # half a pixel
                for kind, label in labels:
                    rows[kind][0].append(frame_tokens[k : k + 1])
                    rows[kind][1].append(label)
            last, last_shot = {id(obj): (x, y) for x, y, obj in seen}, shot
    return {k: (torch.cat(x) if x else torch.zeros(0, 1), torch.tensor(y, dtype=torch.long))
            for k, (x, y) in rows.items()}


def _visual_tokens(model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                   previous_pixels: torch.Tensor | None = None) -> torch.Tensor:
    """(P, D) float features per merged token: the projector's output, or a discrete model's codes one-hot."""
    from keye.models.modeling import continuous_features

    if getattr(model.config, "vision_mode", "continuous") == "continuous":
        return continuous_features(model, pixel_values, grid_thw, previous_pixels).float()
    rows_PN = model.visual_code_ids(pixel_values, grid_thw, previous_pixels) - model.config.text_config.vocab_size
    return torch.nn.functional.one_hot(rows_PN, model.config.visual_tokenizer_config.num_codes).sum(1).float()


def _linear_fit(x_ND: torch.Tensor, y_N: torch.Tensor, weight_decay: float = 1e-3, steps: int = 200):
    """Multinomial logistic regression (L-BFGS, L2) on standardised features -> a predict(x) function."""
    mean, std = x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)
    x = ((x_ND - mean) / std).double()
    classes = int(y_N.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y_N) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return lambda z: (((z - mean) / std).double() @ weight.detach() + bias.detach()).argmax(-1)
