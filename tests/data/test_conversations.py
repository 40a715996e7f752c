"""Conversation jsonl parsing: the three layouts agree, bad rows are named and counted, bad media is skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest

from keye.data.conversations import ConversationDataset, ConversationError, RowFormat, SkipBadSamples, parse_row, read_conversations
from keye.errors import KeyeInputError, VideoError
from keye.video.writer import write_video


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    (tmp_path / "media").mkdir()
    write_video(tmp_path / "media/clip.mp4", np.full((4, 32, 32, 3), 120, dtype=np.uint8), fps=2)
    (tmp_path / "media/a.png").write_bytes(b"not checked here")
    (tmp_path / "media/b.png").write_bytes(b"not checked here")
    (tmp_path / "media/broken.mp4").write_bytes(b"\x00not a video at all" * 10)
    return tmp_path


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


SHAREGPT = {  # LLaMA-Factory sharegpt: conversations/from/value, a system column, images list
    "conversations": [
        {"from": "human", "value": "<image>Compare with <image>. What changed?"},
        {"from": "gpt", "value": "The ball moved."},
    ],
    "system": "You are helpful.",
    "images": ["media/a.png", "media/b.png"],
}
OPENAI = {  # ms-swift / LLaMA-Factory openai style: messages/role/content strings
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "<image>Compare with <image>. What changed?"},
        {"role": "assistant", "content": "The ball moved."},
    ],
    "images": ["media/a.png", "media/b.png"],
}
KEYE = {  # keye-vl-utils / qwen-vl-utils message format
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "media/a.png"},
                {"type": "text", "text": "Compare with "},
                {"type": "image", "image": "file://media/b.png"},
                {"type": "text", "text": ". What changed?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The ball moved."}]},
    ]
}


def test_three_layouts_normalise_to_the_same_conversation(media):
    parsed = [parse_row(row, f"x.jsonl:{i}", media) for i, row in enumerate([SHAREGPT, OPENAI, KEYE])]
    expected = [
        {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(media / "media/a.png")},
                {"type": "text", "text": "Compare with "},
                {"type": "image", "image": str(media / "media/b.png")},
                {"type": "text", "text": ". What changed?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The ball moved."}]},
    ]
    for conv in parsed:
        assert conv.to_messages() == expected
        assert [t.role for t in conv.turns] == ["system", "user", "assistant"]


def test_video_options_and_frame_lists_survive(media):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "video", "video": "media/clip.mp4", "fps": 1.0, "max_pixels": 12544}, "Describe."]},
            {"role": "assistant", "content": "A gray clip."},
            {"role": "user", "content": [{"type": "video", "video": ["media/a.png", "media/b.png"]}, {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": "Two frames."},
        ],
        "id": "r1",
    }
    conv = parse_row(row, "x:1", media)
    v1, v2 = conv.media
    assert v1.path == str(media / "media/clip.mp4") and v1.options == {"fps": 1.0, "max_pixels": 12544}
    assert v2.path == [str(media / "media/a.png"), str(media / "media/b.png")]
    assert conv.meta == {"id": "r1"}
    assert conv.turns[1].text == "A gray clip."


def test_json_array_files_and_listed_media_options(media):
    """LLaMA-Factory keeps datasets as one JSON array; ms-swift lists media as {"path", options}."""
    rows = [OPENAI, {"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "a"}],
                     "videos": [{"path": "media/clip.mp4", "fps": 1.0}]}, {"messages": [{"role": "bot", "content": "x"}]}]
    path = media / "demo.json"
    path.write_text(json.dumps(rows))
    ds = ConversationDataset(path)
    assert len(ds) == 2 and ds.skipped == {"unknown_role": 1} and ds.errors[0].startswith(f"{path}[2]: ")
    (video,) = ds[1].media
    assert video.path == str(media / "media/clip.mp4") and video.options == {"fps": 1.0}
    path.write_text("{}")
    with pytest.raises(KeyeInputError, match="array of rows"):
        ConversationDataset(path)


def test_sharegpt_video_placeholder_and_custom_tags(media):
    row = {"dialog": [{"speaker": "user", "text": "<video>What is it?"}, {"speaker": "assistant", "text": "gray"}], "videos": ["media/clip.mp4"]}
    conv = parse_row(row, "x:1", media, RowFormat(messages_key="dialog", role_tag="speaker", content_tag="text"))
    assert conv.to_messages()[0]["content"] == [{"type": "video", "video": str(media / "media/clip.mp4")}, {"type": "text", "text": "What is it?"}]


@pytest.mark.parametrize(
    "row, reason, words",
    [
        ({**OPENAI, "images": ["media/a.png"]}, "placeholder_mismatch", "more <image> placeholders"),
        ({**OPENAI, "images": ["media/a.png", "media/b.png", "media/a.png"]}, "placeholder_mismatch", "2 <image> placeholders but 3 images"),
        ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown_role", "'robot'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty_assistant", "message 1"),
        ({"messages": [{"role": "user", "content": "<video>hi"}, {"role": "assistant", "content": "x"}], "videos": ["media/nope.mp4"]}, "missing_file", "nope.mp4"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant", "no assistant"),
        ({"messages": []}, "no_messages", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}, {"role": "assistant", "content": "x"}]}, "bad_row", "'audio'"),
    ],
)
def test_bad_rows_name_file_line_and_problem(media, row, reason, words):
    path = _write(media / "data.jsonl", [OPENAI, row])
    good, bad = list(read_conversations(path))
    assert not isinstance(good, ConversationError)
    assert isinstance(bad, ConversationError) and isinstance(bad, KeyeInputError)
    assert bad.reason == reason
    assert str(bad).startswith(f"{path}:2: ") and words in str(bad)


def test_dataset_skips_counts_and_reports(media, caplog):
    rows = [OPENAI, "{not json", KEYE, {**OPENAI, "images": []}, "", {"messages": [{"role": "user", "content": "<video>x"}, {"role": "assistant", "content": "y"}], "videos": ["media/gone.mp4"]}, SHAREGPT]
    path = _write(media / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="keye.data"):
        ds = ConversationDataset(path)
    assert len(ds) == 3
    assert ds.skipped == {"bad_json": 1, "placeholder_mismatch": 1, "missing_file": 1}
    assert ds.errors[0].startswith(f"{path}:2: ")
    assert "kept 3 of 6 rows" in caplog.text and "missing_file=1" in caplog.text
    assert [c.source for c in ds] == [f"{path}:1", f"{path}:3", f"{path}:7"]
    with pytest.raises(KeyeInputError, match="does not exist"):
        ConversationDataset(media / "absent.jsonl")


def _decode(conv) -> int:
    """A stand-in for the collator's decode step: the frame count of the conversation's video."""
    (video,) = conv.media
    try:
        with av.open(video.path) as container:
            return sum(1 for _ in container.decode(video=0))
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"{video.path}: cannot decode ({err})") from err


def test_undecodable_video_is_skipped_and_counted(media):
    def row(name):
        return {"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "a"}], "videos": [f"media/{name}"]}

    ds = ConversationDataset(_write(media / "v.jsonl", [row("clip.mp4"), row("broken.mp4"), row("clip.mp4")]))
    safe = SkipBadSamples(ds, _decode)
    assert [safe[i] for i in range(len(safe))] == [4, 4, 4]  # index 1 falls through to index 2
    assert safe.skipped == {"VideoError": 1} and "broken.mp4" in safe.errors[0]

    all_bad = SkipBadSamples(ConversationDataset(_write(media / "bad.jsonl", [row("broken.mp4")] * 3)), _decode, max_tries=3)
    with pytest.raises(KeyeInputError, match="3 consecutive samples failed"):
        all_bad[0]
    assert all_bad.skipped == {"VideoError": 3}


def test_world_rows_load_unchanged(tmp_path):
    from keye.data.world import SceneConfig, WorldConfig, generate_world

    config = WorldConfig(seed=1, scene=SceneConfig(height=32, width=32, durations=(4.0,)), clips={"train": 3, "val": 1, "test": 1})
    generate_world(tmp_path, config, progress=False)
    for name in ("train.jsonl", "train_zoom.jsonl", "captions.jsonl", "test.jsonl"):
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        ds = ConversationDataset(tmp_path / name)
        assert len(ds) == len(rows) > 0 and not ds.skipped
        for conv, row in zip(ds, rows):
            assert conv.meta["id"] == row["id"]
            assert [p.path for p in conv.media] == [str(tmp_path / p) for p in row["videos"] + row.get("images", [])]
            assert conv.turns[-1].text == row["messages"][-1]["content"]
