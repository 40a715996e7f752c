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


def _published_folder(env, name, preprocessor=None, tokenizer_json=None, chat_template=None):
    """keye-nano written in the published layout with its processor files: the nano tokenizer (or
    ``tokenizer_json``), ``preprocessor_config.json`` (SigLIP's 0.5 unless given) and the nano chat template
    as ``chat_template.jinja`` (or ``chat_template`` as ``chat_template.json``)."""
    folder = env["root"] / name
    save_published(env["model"], folder)
    for f in NANO_TOKENIZER_DIR.iterdir():
        shutil.copy(f, folder / f.name)
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    if chat_template is not None:
        (folder / "chat_template.jinja").unlink()
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}))
    preprocessor = preprocessor if preprocessor is not None else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def test_published_layout_folder_loads_to_the_same_answers(env):
    folder = _published_folder(env, "published")
    assert json.loads((folder / "config.json").read_text()).get("model_type") is None
    pipe = keye.load(folder, device="cpu")
    q = "Describe the scene."
    assert pipe.ask(env["clip"], q, max_new_tokens=TOKENS, **SMALL).raw == env["pipe"].ask(
        env["clip"], q, max_new_tokens=TOKENS, **SMALL).raw
    assert torch.equal(pipe.model.lm_head.weight, env["model"].lm_head.weight)


def _swapped_tokenizer_json(a: str, b: str) -> dict:
    """The nano tokenizer.json with the ids of special tokens ``a`` and ``b`` swapped (tokenizers numbers
    added tokens in list order, so the entries trade places too)."""
    tok = json.loads((NANO_TOKENIZER_DIR / "tokenizer.json").read_text())
    added = tok["added_tokens"]
    i, j = (next(k for k, t in enumerate(added) if t["content"] == name) for name in (a, b))
    added[i], added[j] = dict(added[j], id=added[i]["id"]), dict(added[i], id=added[j]["id"])
    return tok


def test_published_folder_uses_its_own_tokenizer_preprocessor_and_chat_template(env):
    frame, fast_end = "<|frame|>", "<|fast_end|>"
    template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                "You are Keye, watching closely.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
                "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
                "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in c %}"
                "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = _published_folder(env, "published-own-files", preprocessor={"max_pixels": 28 * 28 * 64},
                               tokenizer_json=_swapped_tokenizer_json(frame, fast_end), chat_template=template)
    pipe = keye.load(folder, device="cpu")
    nano_ids = env["processor"].token_ids
    # the ids come from this folder's tokenizer.json, where <|frame|> and <|fast_end|> trade places
    assert pipe.processor.token_ids[frame] == nano_ids[fast_end] and pipe.processor.token_ids[fast_end] == nano_ids[frame]
    messages = build_messages(env["clip"], "What happens?", **SMALL)
    batch = pipe.inputs([messages], "think")
    clip = process_vision_info(messages).videos[0]
    assert int((batch["input_ids"] == nano_ids[fast_end]).sum()) == len(clip)  # one <|frame|> per frame
    prompt = pipe.prompt(messages, "think")
    assert prompt.startswith("<|im_start|>system\nYou are Keye, watching closely.<|im_end|>\n")
    assert prompt.endswith("What happens? /think<|im_end|>\n<|im_start|>assistant\n")
    # preprocessor_config.json without mean / std: the release's CLIP values, applied to every frame
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert pipe.processor.pixel_config.max_pixels == 28 * 28 * 64
    frame0 = clip.frames[0].float() / 255
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    patch = ((frame0 - mean) / std)[:, :14, 14:28].reshape(-1)  # patch (row 0, column 1) of frame 0
    torch.testing.assert_close(batch["pixel_values_videos"][1], patch, rtol=0, atol=1e-6)


@pytest.mark.parametrize("remove", ["tokenizer.json", "preprocessor_config.json", "chat_template"])
def test_published_folder_names_the_missing_processor_file(env, remove):
    folder = _published_folder(env, f"published-without-{remove}")
    for path in folder.glob(f"{remove}*"):
        path.unlink()
    expected = "chat_template.json" if remove == "chat_template" else remove
    with pytest.raises(KeyeInputError, match=f"missing: {expected}"):
        keye.load(folder, device="cpu")


def test_published_tokenizer_without_keye_tokens_is_named(env):
    tok = json.loads((NANO_TOKENIZER_DIR / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|fast_start|>"]
    folder = _published_folder(env, "published-no-fast-start", tokenizer_json=tok)
    config = json.loads((NANO_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["extra_special_tokens"].remove("<|fast_start|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(KeyeInputError, match=r"tokenizer\.json does not have Keye's special tokens \['<\|fast_start\|>'\]"):
        keye.load(folder, device="cpu")


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
