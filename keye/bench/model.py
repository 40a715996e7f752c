"""``python -m keye.bench model``: speed of keye-nano on CPU, one training step and greedy decoding on a
Slow-Fast clip.

    python -m keye.bench model [--frames 16] [--slow 224] [--fast 112] [--steps 5]

Target: keye-nano trains on 2 CPU cores in minutes on 10-30 frames of 112-224 px video.
"""

from __future__ import annotations

import argparse
import time


def synthetic_clip(frames: int, slow: int, fast: int):
    """A ``VideoClip`` of random frames, every fourth slow."""
    import torch

    from keye.video.types import FAST, SLOW, VideoClip

    types = [SLOW if i % 4 == 0 else FAST for i in range(frames)]
    pixels = [torch.randint(0, 256, (3, slow, slow) if t == SLOW else (3, fast, fast), dtype=torch.uint8) for t in types]
    return VideoClip(frames=pixels, frame_types=torch.tensor(types, dtype=torch.int32),
                     timestamps=torch.arange(frames) * 0.5, indices=torch.arange(frames),
                     slow_size=(slow, slow), fast_size=(fast, fast), source_fps=2.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--slow", type=int, default=224)
    parser.add_argument("--fast", type=int, default=112)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    import torch

    from keye.models import build_model
    from keye.processing import load_nano_processor


    torch.manual_seed(0)
    processor = load_nano_processor()
    model = build_model("keye-nano")
    clip = synthetic_clip(args.frames, args.slow, args.fast)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
                {"role": "assistant", "content": "A red ball rolls to the left."}]
    batch = processor(text=processor.apply_chat_template(messages, add_generation_prompt=False), videos=[clip],
                      return_labels=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[1:])[len(times[1:]) // 2]

    model.eval()
    prompt = processor(text=processor.apply_chat_template(messages[:1]), videos=[clip])
    start = time.perf_counter()
    out = model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    gen_s = time.perf_counter() - start
    result = {
        "threads": torch.get_num_threads(), "frames": args.frames, "seq_len": int(batch["input_ids"].shape[1]),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "train_step_s": step_s,
        "generate_tok_per_s": (out.shape[1] - prompt["input_ids"].shape[1]) / gen_s,
    }
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0
