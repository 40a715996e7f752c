"""keye.load / KeyePipeline on a tiny random keye-nano saved to disk: loading every checkpoint kind,
greedy equivalences (loaded == in-memory, batched == one by one, streamed == whole), trimming,
modes, several media in one question, and the `keye ask` command."""

import json
import logging
import shutil

import pytest
import torch

import keye
from keye.api import build_messages
from keye.cli import main
from keye.errors import KeyeInputError
from keye.models import build_model
from keye.models.adapter import save_published
from keye.processing import NANO_TOKENIZER_DIR, load_nano_processor
from keye.video import process_vision_info
from keye.video.synthetic import write_cut_clip

SMALL = {"max_pixels": 56 * 56, "fps": 2.0}
TOKENS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # one thread: the suite runs beside other workers on two cores, where torch's default
    # thread pool oversubscribes and tiny generations get ~10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    model = build_model("keye-nano").eval()
    processor = load_nano_processor()
    model.save_pretrained(root / "ckpt")
    processor.save_pretrained(root / "ckpt")
    clip = root / "clip.mp4"
    write_cut_clip(clip, num_frames=8, height=56, width=56, cuts=(4,), fps=2.0, seed=1)
    clip2 = root / "clip2.mp4"
    write_cut_clip(clip2, num_frames=6, height=56, width=84, cuts=(3,), fps=2.0, seed=2)
    pipe = keye.load(root / "ckpt", device="cpu")
    yield {"root": root, "model": model, "processor": processor, "clip": str(clip), "clip2": str(clip2), "pipe": pipe}
    torch.set_num_threads(threads)


def test_loaded_checkpoint_answers_like_the_in_memory_model(env):
    messages = build_messages(env["clip"], "What happens in the video?", **SMALL)
    processor = env["processor"]
    text = processor.apply_chat_template(messages, think_mode="no_think")
    batch = processor(text=[text], vision=process_vision_info(messages))
    with torch.no_grad():
        out = env["model"].generate(**batch, max_new_tokens=TOKENS, do_sample=False,
                                    eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    reference = processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    answer = env["pipe"].ask(env["clip"], "What happens in the video?", "no_think", max_new_tokens=TOKENS, **SMALL)
    assert reference  # random weights still emit text, so the comparison below is not between two empty strings
    assert answer.raw == reference
    assert answer.mode == "no_think" and answer.thinking == ""


def test_published_layout_folder_loads_to_the_same_answers(env):
    folder = env["root"] / "published"
    save_published(env["model"], folder)
    for f in NANO_TOKENIZER_DIR.iterdir():
        shutil.copy(f, folder / f.name)
    assert json.loads((folder / "config.json").read_text()).get("model_type") is None
    pipe = keye.load(folder, device="cpu")
    q = "Describe the scene."
    assert pipe.ask(env["clip"], q, max_new_tokens=TOKENS, **SMALL).raw == env["pipe"].ask(
        env["clip"], q, max_new_tokens=TOKENS, **SMALL).raw
    assert torch.equal(pipe.model.lm_head.weight, env["model"].lm_head.weight)


def test_variant_name_warns_untrained_and_large_variants_need_a_checkpoint(caplog):
    with caplog.at_level(logging.WARNING, logger="keye.api"):
        pipe = keye.load("keye-nano", device="cpu")
    assert "RANDOM weights" in caplog.text
    assert pipe.model.config.text_config.num_experts == 4
    with pytest.raises(KeyeInputError, match="no bundled tokenizer"):
        keye.load("keye-vl-1.5-8b", device="cpu")
    with pytest.raises(KeyeInputError, match="no such checkpoint"):
        keye.load("/nonexistent/keye-ckpt")


def test_batched_questions_equal_one_by_one(env):
    pipe = env["pipe"]
    questions = ["How many scenes are there?", "What colour is the square that moves across the frame?"]
    batched = pipe.ask(env["clip"], questions, max_new_tokens=TOKENS, **SMALL)
    single = [pipe.ask(env["clip"], q, max_new_tokens=TOKENS, **SMALL).raw for q in questions]
    assert [a.raw for a in batched] == single
    pairs = pipe.ask_batch([(env["clip"], questions[0]), (env["clip2"], questions[0])], max_new_tokens=TOKENS, **SMALL)
    assert pairs[1].raw == pipe.ask(env["clip2"], questions[0], max_new_tokens=TOKENS, **SMALL).raw


def test_stream_concatenates_to_the_answer(env):
    pipe = env["pipe"]
    pieces = list(pipe.ask(env["clip"], "What happens?", "think", max_new_tokens=TOKENS, stream=True, **SMALL))
    assert len(pieces) > 1
    assert "".join(pieces) == pipe.ask(env["clip"], "What happens?", "think", max_new_tokens=TOKENS, **SMALL).raw


def test_trimming_changes_the_frames_the_model_sees(env):
    full = process_vision_info(build_messages(env["clip"], "q", **SMALL)).videos[0]
    trimmed = process_vision_info(build_messages(env["clip"], "q", video_start=2.0, video_end=3.5, **SMALL)).videos[0]
    assert full.timestamps.min() < 1.0 and len(trimmed) < len(full)
    assert trimmed.timestamps.min() >= 2.0 and trimmed.timestamps.max() <= 3.5
    pipe = env["pipe"]
    batch = pipe.inputs([build_messages(env["clip"], "q", video_start=2.0, video_end=3.5, **SMALL)])
    assert batch["video_grid_thw"].shape[0] == len(trimmed)


def test_mode_sets_the_prompt_suffix(env):
    pipe = env["pipe"]
    messages = build_messages(env["clip"], "How many scenes?")
    assert pipe.prompt(messages, "think").endswith("How many scenes? /think<|im_end|>\n<|im_start|>assistant\n")
    assert pipe.prompt(messages, "no_think").endswith("How many scenes? /no_think<|im_end|>\n<|im_start|>assistant\n")
    assert pipe.prompt(messages, "auto").endswith("How many scenes?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(KeyeInputError, match="mode"):
        pipe.prompt(messages, "deep")


def test_several_videos_and_an_image_in_one_question(env):
    image = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    media = [env["clip"], env["clip2"], {"image": image}]
    messages = build_messages(media, "Which clip matches the picture?", **SMALL)
    assert [p["type"] for p in messages[0]["content"]] == ["video", "video", "image", "text"]
    vision = process_vision_info(messages)
    batch = env["pipe"].inputs([messages])
    vision_start = env["processor"].tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert int((batch["input_ids"] == vision_start).sum()) == 3
    assert batch["video_grid_thw"].shape[0] == len(vision.videos[0]) + len(vision.videos[1])
    h, w = vision.images[0].pixels.shape[-2:]
    assert batch["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    answer = env["pipe"].ask(media, "Which clip matches the picture?", max_new_tokens=TOKENS, **SMALL)
    assert answer.raw


def test_keye_ask_command(env, capsys):
    ckpt = str(env["root"] / "ckpt")
    args = ["ask", env["clip"], "What happens?", "--model", ckpt, "--device", "cpu", "--mode", "no_think",
            "--max-new-tokens", str(TOKENS), "--max-pixels", str(56 * 56), "--fps", "2", "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = env["pipe"].ask(env["clip"], "What happens?", "no_think", max_new_tokens=TOKENS, **SMALL)
    assert printed["raw"] == expected.raw and printed["answer"] == expected.text

    assert main(["ask", str(env["root"] / "missing.mp4"), "q", "--model", ckpt]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keye ask: error:") and "missing.mp4" in err and "\n" not in err
    assert main(["ask", env["clip"], "q", "--model", ckpt, "--video-start", "3", "--video-end", "1"]) == 2
    assert "video_start" in capsys.readouterr().err
