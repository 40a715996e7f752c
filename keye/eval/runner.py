"""Run a benchmark: prompts -> generations -> extracted answers -> accuracy, resumably.

Out folder::

    run.json            what produced the predictions (definition, model, mode, video sampling); a rerun must match
    predictions.jsonl   one line per finished item, appended and fsynced item by item
    results.json        overall and per-category accuracy, and per category each reference answer: right of n
                        and how often the model gave it (rewritten atomically at the end); on world splits,
                        also how many of the chains' placements ("the red circle is in the top left at
                        1.0s") the clip's frame listing confirms
    results.md          the same as markdown

A rerun reads ``predictions.jsonl`` and asks the model only about the items not in it, so a run
killed halfway loses at most the batch in flight. A torn last line (killed mid-write) is dropped.
Items whose input is bad (a missing or unreadable video) are recorded with their error, counted as
wrong and as ``errors``, and asked again on the next rerun.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from keye.errors import KeyeInputError
from keye.data.answers import LETTERS, extract_choice, final_answer, is_correct, normalize
from keye.data.world.words import confirmed_claims
from keye.eval.formats import EvalDefinition, EvalItem, check_definition, read_items
from keye.fileio import atomic_write_text
from keye.video import VideoOptions

# A batch of conversations (qwen-vl-utils messages) -> one raw generation each.
Predictor = Callable[[list[list[dict]]], list[str]]


def format_prompt(template: str, item: EvalItem) -> str:
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options or []))
    return template.format(question=item.question, options=options).strip()


def item_messages(item: EvalItem, template: str, video_options: dict | None = None) -> list[dict]:
    """The user turn for ``item``: its media (definition options, then the item's own, e.g. trims) and the prompt."""
    parts = [{**(video_options or {}), **m} if m.get("type") == "video" else dict(m) for m in item.media]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": format_prompt(template, item)}]}]


def score(item: EvalItem, raw: str) -> tuple[str | None, bool]:
    """(prediction, correct): an option letter for multiple choice, the normalised answer otherwise."""
    pred = extract_choice(raw, item.options) if item.options else normalize(final_answer(raw))
    return pred, is_correct(raw, item.answer, item.options)


def pipeline_predictor(pipe, mode: str = "no_think", max_new_tokens: int = 32, **generate_kwargs) -> Predictor:
    """A ``Predictor`` from a ``keye.api.KeyePipeline`` (greedy by default)."""
    def predict(conversations: list[list[dict]]) -> list[str]:
        return pipe.generate(conversations, mode, max_new_tokens, **generate_kwargs)

    return predict


# ----------------------------------------------------------------------------- predictions store


class PredictionStore:
    """Append-only jsonl of finished items, keyed by item id."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn last write: keep whole lines only
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        for n, line in enumerate(data.decode().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise KeyeInputError(f"{self.path}:{n}: not valid JSON ({err}); delete the line to resume") from None
                self.done[record["id"]] = record

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[record["id"]] = record


def _check_run(out_dir: Path, meta: dict) -> None:
    """Refuse to mix predictions of different definitions, models or modes in one folder."""
    path = out_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in meta if k in old and old[k] != meta[k]]
        if changed:
            k = changed[0]
            raise KeyeInputError(f"{out_dir}: holds predictions for {k}={old[k]!r}, not {meta[k]!r}; "
                                 "use another --out folder (or delete this one)")
    atomic_write_text(path, json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------- metrics and reports


def accuracy_table(records: list[dict], breakdown: list[str]) -> dict:
    """Overall and per-category accuracy over prediction records (and the items' guess, where they have one)."""
    def acc(rs: list[dict]) -> dict:
        correct = sum(bool(r["correct"]) for r in rs)
        out = {"n": len(rs), "correct": correct, "accuracy": correct / len(rs) if rs else 0.0,
               "unanswered": sum(r["pred"] in (None, "") for r in rs), "errors": sum("error" in r for r in rs)}
        if rs and all("guess_correct" in r for r in rs):
            out["guess_accuracy"] = sum(r["guess_correct"] for r in rs) / len(rs)
        placed = [r["placements"] for r in rs if "placements" in r]
        if placed:
            claims, right = sum(c for c, _ in placed), sum(k for _, k in placed)
            out["placements"] = {"claims": claims, "right": right, "share": right / claims if claims else None}
        return out

    out = {"overall": acc(records), "by": {}}
    fields = breakdown or sorted({k for r in records for k in r.get("categories", {})})
    for name in fields:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            if name in r.get("categories", {}):
                groups[r["categories"][name]].append(r)
        if groups:
            out["by"][name] = {value: acc(rs) for value, rs in sorted(groups.items())}
            out.setdefault("answers", {})[name] = {value: answer_table(rs) for value, rs in sorted(groups.items())}
    return out


def answer_table(records: list[dict]) -> dict:
    """Per reference answer: how many items have it, how many of those the model got right, and how many
    times the model answered it anywhere in ``records``. A model that never says one answer, or says one
    whatever is asked, shows here where a group's accuracy hides it."""
    predicted = Counter(str(r["pred"]) for r in records if r["pred"] is not None)
    table: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: str(r["answer"])):
        answer = str(r["answer"])
        row = table.setdefault(answer, {"n": 0, "correct": 0, "predicted": predicted[answer]})
        row["n"] += 1
        row["correct"] += bool(r["correct"])
    return table


def markdown_report(results: dict) -> str:
    overall = results["overall"]
    guess = "guess_accuracy" in overall  # the items' trivial guess, scored beside the model
    placed = bool(overall.get("placements", {}).get("claims"))  # generated chains that place objects

    def placements(g: dict) -> str:
        p = g.get("placements") or {}
        return f" {p['right']}/{p['claims']} ({100 * p['share']:.1f}) |" if p.get("claims") else " - |"

    def table(title: str, groups: dict) -> list[str]:
        head = f"| {title} | n | accuracy |" + (" guess |" if guess else "")
        head += " chain placements right |" if placed else ""
        rule = "| --- | ---: | ---: |" + (" ---: |" if guess else "") + (" ---: |" if placed else "")
        return [head, rule] + [f"| {value} | {g['n']} | {100 * g['accuracy']:.1f} |"
                               + (f" {100 * g['guess_accuracy']:.1f} |" if guess else "")
                               + (placements(g) if placed else "") for value, g in groups.items()]

    lines = [f"# {results['name']}", "", f"model: `{results.get('model', '')}`, mode: {results.get('mode', '')}", ""]
    lines += table("split", {"overall": overall})
    if placed:
        lines += ["", "Chain placements right: of the places the generated chains give an object at a time (\"the "
                      "red circle is in the top left at 1.0s\"), how many the clip's frame listing confirms."]
    if overall["errors"]:
        lines += ["", f"{overall['errors']} questions failed on bad input and count as wrong; see predictions.jsonl "
                      "(a rerun retries them)."]
    for name, groups in results["by"].items():
        lines += [""] + table(name, groups)
    for name, groups in results.get("answers", {}).items():
        lines += ["", f"Answers by {name}: right of n where it is the answer (times the model gave it).", ""]
        lines += [f"- {value}: " + ", ".join(f"{answer} {a['correct']}/{a['n']} ({a['predicted']})"
                                             for answer, a in answers.items()) for value, answers in groups.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the loop


def _predict(predict: Predictor, conversations: list[list[dict]]) -> list[tuple[str | None, str | None]]:
    """(raw, None) per conversation, or (None, message) for those whose input is bad (an unreadable
    video, a trim past the end): one broken item must not stop a 2,700-question run. A failing
    batch is retried item by item so only the bad ones are lost."""
    try:
        raws = predict(conversations)
    except KeyeInputError as err:
        if len(conversations) == 1:
            return [(None, str(err))]
        return [outcome for c in conversations for outcome in _predict(predict, [c])]
    if len(raws) != len(conversations):
        raise RuntimeError(f"predictor returned {len(raws)} answers for {len(conversations)} questions")
    return [(raw, None) for raw in raws]


def run_eval(definition: EvalDefinition, predict: Predictor, out_dir: str | os.PathLike | None = None, *,
             model_name: str = "", limit: int | None = None, batch_size: int = 1, progress: bool = True,
             video_options: dict | None = None) -> dict:
    """Evaluate ``predict`` on ``definition``'s items; returns (and with ``out_dir`` writes) the results.

    Items already in ``out_dir/predictions.jsonl`` are not asked again. ``limit`` keeps the first
    N items (a smoke run); ``video_options`` override the definition's ``video`` options.
    """
    check_definition(definition)
    items = read_items(definition)[:limit]
    store = None
    options = {**definition.video.message(), **(video_options or {})}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _check_run(out, {"definition": definition.name, "format": definition.format, "model": model_name,
                         "mode": definition.mode, "video": {**options, "slow_fast": definition.video.slow_fast}})
        store = PredictionStore(out / "predictions.jsonl")
    # items that failed on bad input (e.g. a missing video) are retried on every rerun
    done = {k: r for k, r in store.done.items() if "error" not in r} if store else {}
    todo = [item for item in items if item.id not in done]
    records = dict(done)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=definition.name, disable=not progress,
               unit="q", dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        outcomes = _predict(predict, [item_messages(item, definition.prompt, options) for item in batch])
        for item, (raw, error) in zip(batch, outcomes):
            pred, correct = score(item, raw) if error is None else (None, False)
            record = {"id": item.id, "answer": item.answer, "pred": pred, "correct": correct, "raw": raw or "",
                      "categories": item.categories}
            if item.guess is not None:
                record["guess_correct"] = is_correct(item.guess, item.answer, item.options)
            if error is not None:
                record["error"] = error
                bar.write(f"{definition.name}: {item.id}: {error}")
            records[item.id] = record
            if store:
                store.append(record)
        bar.update(len(batch))
    bar.close()
    for item in items:  # computed here, not when asked, so predictions from before this count too
        record = records[item.id]
        if item.listing is not None and "error" not in record:
            record["placements"] = list(confirmed_claims(record["raw"], item.listing))
    results = {
        "name": definition.name, "format": definition.format, "model": model_name, "mode": definition.mode,
        **accuracy_table([records[item.id] for item in items], definition.breakdown),
    }
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "results.json", json.dumps(results, indent=2))
        atomic_write_text(Path(out_dir) / "results.md", markdown_report(results))
    return results


def evaluate_world(pipe, split_jsonl: str | os.PathLike, *, out_dir=None, mode: str = "no_think",
                   max_new_tokens: int = 16, video_options: dict | None = None, limit: int | None = None,
                   batch_size: int = 1, slow_fast: bool | None = None, progress: bool = False) -> dict:
    """Open-ended accuracy on a synthetic-world split (``keye.data.world``), overall and per ``kind``.

    pipe: a ``keye.api.KeyePipeline`` (``keye.api.KeyePipeline(model, processor)`` wraps a bare model).
    video_options / slow_fast: the message options and sampling training used (e.g. a stage's
    ``video.message()`` and ``video.slow_fast``), so the model sees frames the way it learnt them;
    ``slow_fast`` overrides the pipeline's own setting for this call only (None: keep it). Returns
    ``run_eval``'s results, by kind, by the asked object's company and by shots where the split's world.json
    is beside it (``keye.data.world.grounding.scene_categories``), with ``per_kind``: kind -> accuracy added.
    """
    was_training = pipe.model.training
    # A pipeline's own Slow-Fast setting must not override the sampling the model was trained with:
    # frames it never saw (fast frames at Keye's 48-token floor beside 16-token slow ones) cost the
    # nano model up to 14 points, and that cost varied from run to run.
    own_slow_fast = pipe.slow_fast
    pipe.slow_fast = own_slow_fast if slow_fast is None else slow_fast
    split = Path(split_jsonl)
    definition = EvalDefinition(name=f"world-{split.stem}", format="world", annotations=str(split.resolve()),
                                prompt="{question}", mode=mode, max_new_tokens=max_new_tokens,
                                video=VideoOptions.from_message(video_options or {}, "video_options", pipe.slow_fast),
                                breakdown=["kind", "company", "shots"])
    try:  # called from a training loop: hand the model back in the mode it came in
        results = run_eval(definition, pipeline_predictor(pipe, mode, max_new_tokens), out_dir, limit=limit,
                           batch_size=batch_size, progress=progress)
    finally:
        pipe.model.train(was_training)
        pipe.slow_fast = own_slow_fast
    results["per_kind"] = {kind: g["accuracy"] for kind, g in results["by"].get("kind", {}).items()}
    return results
