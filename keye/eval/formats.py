"""Benchmark definitions (``eval/*.yaml``) and the annotation formats they read.

A definition names a format, where its annotations and videos are, the prompt template and the
generation settings. Each format is one registered function turning the annotations into
``EvalItem`` rows; the runner never looks at the original field names.

* ``videomme``: Video-MME rows (the ``videomme/test-*.parquet`` of its release, or json / jsonl with
  the same fields): ``videoID``, ``question_id``, ``duration``, ``domain``, ``sub_category``,
  ``task_type``, ``question``, ``options`` ("A. ..." strings) and ``answer`` (a letter). Videos are
  ``{video_dir}/{videoID}.mp4``.
* ``mvbench``: MVBench's per-task json files (``video``, ``question``, ``candidates``, ``answer`` as
  the candidate's text, and ``start`` / ``end`` seconds for the tasks that trim); the definition's
  ``tasks`` maps each task name to its json and its video folder, as MVBench's own ``data_list`` does.
* ``world``: a split of the synthetic world (``keye.data.world``): open-ended, exact match after
  normalisation, scored per question ``kind``; rows with ``options`` are scored as multiple choice.
* ``world-text``: the same rows answered from text, no video (the text oracle): each question follows its
  clip's ground-truth listing (``keye.data.world.text``), rebuilt from the ``world.json`` beside the split.
* ``lookup``: the decoder sanity check (``keye.data.world.probes.lookup_probe``), generated, no annotations:
  one frame's object listing as text and a question picking one object out of it; every item carries the
  first-listed guess, so the report shows that baseline beside the model's accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keye.config import load_config
from keye.errors import ConfigError, KeyeInputError
from keye.data.answers import LETTERS, option_text
from keye.registry import registrar
from keye.video import VideoOptions

# the repository's eval/ folder (benchmark definitions are data, next to the package)
DEFINITIONS_DIR = Path(__file__).resolve().parents[2] / "eval"


@dataclass
class TaskSpec:
    """One MVBench task: its annotation json (relative to ``annotations``) and video folder
    (relative to ``video_dir``); ``bound``: the rows carry start / end seconds to trim to."""

    file: str
    video_dir: str = ""
    bound: bool = False


@dataclass
class EvalDefinition:
    """A benchmark run. Relative paths resolve against the definition file's folder.

    prompt: template with ``{question}`` and ``{options}`` (the options as "A. text" lines).
    video: options for every video (``keye.video.VideoOptions``: fps, max_frames, max_pixels, ...; and
        ``slow_fast``, the sampling mode the command line uses unless its flags say otherwise).
    breakdown: item fields to report accuracy by, besides the overall number.
    """

    name: str
    format: str
    annotations: str = ""  # the annotation file or folder; generated formats (lookup) take none
    video_dir: str = ""
    prompt: str = "{question}\n{options}"
    mode: str = "no_think"
    max_new_tokens: int = 32
    video: VideoOptions = field(default_factory=VideoOptions)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    breakdown: list[str] = field(default_factory=list)
    items: int = 400  # generated formats: how many items
    seed: int = 0  # generated formats: their draw (0: the format's own seed)
    base_dir: str = ""  # set by load_definition: the folder relative paths start from

    def __post_init__(self):
        self.video.validated(f"definition {self.name}: video")

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir or ".") / p


@dataclass
class EvalItem:
    """One question. ``answer`` is a letter when ``options`` is set, else the reference text;
    ``media`` are message parts (paths plus per-item options such as video_start / video_end)."""

    id: str
    question: str
    answer: str
    options: list[str] | None
    media: list[dict]
    categories: dict[str, str] = field(default_factory=dict)
    guess: str | None = None  # a trivial strategy's answer (e.g. the first-listed word), scored beside the model
    # the clip's frame listing ([seconds, "red circle top left, ..."] per 2 fps frame), where the item has one:
    # the runner checks a generated chain's placements against it
    listing: list | None = None


FormatReader = Callable[[EvalDefinition], list[EvalItem]]
FORMATS: dict[str, FormatReader] = {}


register_format = registrar(FORMATS)


def definition_path(name_or_path: str) -> Path:
    """The yaml file a definition path or name (of a file in the repository's ``eval/`` folder) means."""
    path = Path(name_or_path)
    if not path.is_file():
        candidate = DEFINITIONS_DIR / f"{name_or_path}.yaml"
        if not candidate.is_file():
            known = sorted(p.stem for p in DEFINITIONS_DIR.glob("*.yaml")) if DEFINITIONS_DIR.is_dir() else []
            raise ConfigError(f"{name_or_path}: no such definition file or name (known: {', '.join(known)}; "
                              f"formats: {', '.join(sorted(FORMATS))})")
        path = candidate
    return path


def load_definition(name_or_path: str, overrides: list[str] | None = None) -> EvalDefinition:
    """A definition from a yaml path, or a name of a file in the repository's ``eval/`` folder."""
    path = definition_path(name_or_path)
    definition = load_config(EvalDefinition, path, overrides)
    definition.base_dir = definition.base_dir or str(path.resolve().parent)
    return check_definition(definition)


def check_definition(definition: EvalDefinition) -> EvalDefinition:
    if definition.format not in FORMATS:
        raise ConfigError(f"definition {definition.name}: unknown format {definition.format!r}; "
                          f"known: {', '.join(sorted(FORMATS))}")
    if definition.mode not in ("auto", "think", "no_think"):
        raise ConfigError(f"definition {definition.name}: mode must be auto, think or no_think, got {definition.mode!r}")
    return definition


def read_items(definition: EvalDefinition) -> list[EvalItem]:
    items = FORMATS[definition.format](definition)
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise KeyeInputError(f"{definition.name}: duplicate item id {item.id!r}")
        seen.add(item.id)
    return items


def read_rows(path: Path) -> list[dict]:
    """Rows of a .parquet, .jsonl or .json (a list, or a dict of lists as some exports write)."""
    if not path.is_file():
        raise KeyeInputError(f"{path}: annotation file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise KeyeInputError(f"{path}: not valid jsonl ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise KeyeInputError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict):
        data = [row for rows in data.values() for row in rows]
    if not isinstance(data, list):
        raise KeyeInputError(f"{path}: expected a list of rows")
    return data


def _annotations(definition: EvalDefinition) -> Path:
    if not definition.annotations:
        raise KeyeInputError(f"definition {definition.name}: format {definition.format!r} reads annotations; "
                             "give --data or set 'annotations'")
    return definition.path(definition.annotations)


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise KeyeInputError(f"{where}: missing field(s) {', '.join(missing)}")


@register_format("videomme")
def _videomme(definition: EvalDefinition) -> list[EvalItem]:
    path = _annotations(definition)
    video_dir = definition.path(definition.video_dir) if definition.video_dir else path.parent
    items = []
    for i, row in enumerate(read_rows(path)):
        where = f"{path} row {i}"
        _need(row, ("videoID", "question_id", "question", "options", "answer"), where)
        options = [option_text(o) for o in row["options"]]
        answer = str(row["answer"]).strip().upper()
        if answer not in LETTERS[: len(options)]:
            raise KeyeInputError(f"{where}: answer {row['answer']!r} is not one of the option letters")
        categories = {k: str(row[k]) for k in ("duration", "domain", "sub_category", "task_type") if k in row}
        items.append(EvalItem(str(row["question_id"]), row["question"], answer, options,
                              [{"type": "video", "video": str(video_dir / f"{row['videoID']}.mp4")}], categories))
    return items


@register_format("mvbench")
def _mvbench(definition: EvalDefinition) -> list[EvalItem]:
    if not definition.tasks:
        raise ConfigError(f"definition {definition.name}: the mvbench format needs 'tasks' (name -> file, video_dir)")
    root = _annotations(definition)
    video_root = definition.path(definition.video_dir) if definition.video_dir else root
    items = []
    for task, spec in definition.tasks.items():
        path = root / spec.file
        for i, row in enumerate(read_rows(path)):
            where = f"{path} row {i}"
            _need(row, ("video", "question", "candidates", "answer"), where)
            candidates = [str(c) for c in row["candidates"]]
            if row["answer"] not in candidates:
                raise KeyeInputError(f"{where}: answer {row['answer']!r} is not among the candidates")
            part = {"type": "video", "video": str(video_root / spec.video_dir / row["video"])}
            if spec.bound and "start" in row and "end" in row:
                part.update(video_start=float(row["start"]), video_end=float(row["end"]))
            items.append(EvalItem(f"{task}/{i}", row["question"], LETTERS[candidates.index(row["answer"])],
                                  candidates, [part], {"task": task}))
    return items


def _world_split(definition: EvalDefinition, need_clips: bool = False
                 ) -> tuple[list[EvalItem], list[dict], dict | None]:
    """The split's items, its rows and, where the ``world.json`` beside it is, its clips rebuilt by id
    (``need_clips``: an error when it is missing)."""
    from keye.data.world import WorldConfig
    from keye.data.world.generate import clips_of_rows, frame_texts
    from keye.data.world.grounding import scene_categories

    path = _annotations(definition)
    base = definition.path(definition.video_dir) if definition.video_dir else path.parent
    rows = read_rows(path)
    for i, row in enumerate(rows):
        _need(row, ("id", "question", "answer", "kind", "videos") + (("clip_id",) if need_clips else ()),
              f"{path} row {i}")
    world_json, clips = path.parent / "world.json", None
    if world_json.is_file():
        config = WorldConfig.from_dict(json.loads(world_json.read_text())["config"])
        clips = clips_of_rows(config, [r for r in rows if "clip_id" in r])
    elif need_clips:
        raise KeyeInputError(f"{path}: the {definition.format} format rebuilds each clip from the world.json beside "
                             f"the split, and {world_json} is missing")
    listings = {clip_id: frame_texts(clip) for clip_id, clip in (clips or {}).items()}  # once per clip
    items = []
    for row in rows:
        # the row's question already lists its options ("A. ..."), as in training; score them as a choice
        options = row.get("options") or None
        media = [{"type": "video", "video": str(base / v)} for v in row["videos"]]
        categories = {"kind": row["kind"], "reasoning": str(bool(row.get("reasoning", False))).lower()}
        if row.get("clip_id") in listings:
            categories.update(scene_categories(clips[row["clip_id"]], row["kind"], row["question"]))
        items.append(EvalItem(row["id"], row["question"], str(row["answer"]), options, media, categories,
                              listing=listings.get(row.get("clip_id"))))
    return items, rows, clips


@register_format("world")
def _world(definition: EvalDefinition) -> list[EvalItem]:
    return _world_split(definition)[0]


@register_format("lookup")
def _lookup(definition: EvalDefinition) -> list[EvalItem]:
    from keye.data.world.probes import PROBE_SEED, lookup_probe

    return [EvalItem(p.id, p.question, p.answer, None, [], {"kind": p.kind, "objects": str(p.objects)}, p.first_listed)
            for p in lookup_probe(definition.items, definition.seed or PROBE_SEED)]


@register_format("world-text")
def _world_text(definition: EvalDefinition) -> list[EvalItem]:
    from keye.data.world.text import oracle_text

    items, rows, clips = _world_split(definition, need_clips=True)
    return [EvalItem(item.id, oracle_text(clips[row["clip_id"]], row["question"]), item.answer, item.options, [],
                     item.categories) for item, row in zip(items, rows)]
