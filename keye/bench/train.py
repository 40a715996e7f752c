"""``python -m keye.bench train``: training speed and memory, the toolkit beside a bare loop, and at length.

    python -m keye.bench train [--steps 8] [--lengths 4096,8192,16384,32768] [--out bench_train.json]

1. **keye-nano on CPU, the toolkit beside a bare loop.** The same model, seed and samples (video + text) per
   step: a plain transformers loop (padded batches, ``model(**batch).loss`` over the full logits, AdamW, clip)
   and the toolkit's runner (``keye.train.runner.train``: the session, packed rows, varlen attention, the
   sparse chunked loss), also on padded rows. Tokens/s are real (unpadded) tokens over the median step time
   (the first step is warm-up); peak memory is the process's. The toolkit must not be slower.
2. **Memory against row length on CPU.** One training step of keye-nano on one packed row of L tokens of
   video + text samples (4K-32K by default, and the eager dense-mask reference at short lengths): the peak
   memory the step adds, beside the memory plan of ``keye.models.memory`` (activations, gradients and Adam's
   moments) and its error. Linear in L means a constant MiB per 1K tokens.
3. **On a CUDA GPU** (skipped without one): Keye-VL-1.5-8B and Keye-VL-2.0-30B-A3B shapes with their decoder
   cut to ``--gpu-layers`` layers, bf16 autocast over float32 weights (``run.precision: bf16``), packed text
   rows of 8K and 32K tokens, activation checkpointing and the chunked loss: tokens/s, MFU (model FLOPs over
   the GPU's dense bf16 peak), peak memory beside the plan, and the kernels that take the most time.

Every measurement runs in a fresh process (``--worker``), so peaks do not leak between rows. A table is
printed and the figures are written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20
# dense bf16 tensor-core peak (FLOP/s) by device name, for MFU
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="steps per loop (the first is warm-up)")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per step in the CPU loops")
    parser.add_argument("--lengths", default="4096,8192,16384,32768", help="packed row lengths for the memory rows")
    parser.add_argument("--dense-lengths", default="2048,4096", help="row lengths for the eager dense-mask reference")
    parser.add_argument("--gpu-layers", default="8b=8,30b-a3b=4", help="decoder layers kept per GPU shape")
    parser.add_argument("--gpu-lengths", default="8192,32768", help="packed row lengths on the GPU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: loops, rows, gpu")
    parser.add_argument("--out", default="bench_train.json", help="JSON file for the figures")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- shared pieces


def nano_samples(n: int, seed: int = 0):
    """``n`` keye-nano training samples: a synthetic Slow-Fast clip of 2-4 frames and a question with an answer
    of 4-60 words (labels on the answer), built with the nano processor."""
    import torch

    from keye.bench.model import synthetic_clip
    from keye.data.collate import Sample
    from keye.processing import load_nano_processor

    processor = load_nano_processor()
    g = torch.Generator().manual_seed(seed)
    words = "the red ball rolls left then a blue cube slides right past the green ring and stops".split()
    samples = []
    for i in range(n):
        frames = int(torch.randint(2, 5, (1,), generator=g))
        clip = synthetic_clip(frames, slow=56, fast=28)
        answer = " ".join(words[int(j)] for j in torch.randint(0, len(words), (int(torch.randint(4, 61, (1,), generator=g)),),
                                                              generator=g))
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": f"What happens in clip {i}?"}]},
                    {"role": "assistant", "content": answer}]
        text = processor.apply_chat_template(messages, add_generation_prompt=False)
        enc = processor(text=[text], videos=[clip], return_labels=True)
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "labels")}
        samples.append(Sample(enc["input_ids"][0], enc["labels"][0], vision))
    return samples, processor


def _peak_rss() -> float:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current resident memory (Linux), so the next peak is the next step's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _spawn(spec: dict, threads: int, timeout: int = 3600) -> dict:
    """Run one measurement in a fresh process; returns its JSON result (or the error)."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "keye.bench", "train", "--worker", json.dumps(spec), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- 1. loops on CPU


def _bare_loop(model, samples, plan, steps: int, pad_id: int) -> list[float]:
    """A plain transformers training loop: padded batch, the model's own loss over every logit, AdamW, clip."""
    import torch

    from keye.data.collate import collate

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = collate([samples[i] for i in plan.indices(step)], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def _keye_loop(model, samples, steps: int, micro_batch: int, processor, packed: bool) -> list[float]:
    """The toolkit's runner over the same samples in the same order (its BatchPlan, seed 0)."""
    import functools

    from keye.data.collate import count_label_tokens
    from keye.train.metrics import read_metrics
    from keye.train.optim import OptimConfig
    from keye.train.runner import train
    from keye.train.session import RunConfig
    from keye.train.stages.lm import LMStageConfig, lm_collate, lm_loss_fn

    stage = LMStageConfig(packing=packed, max_length=max(len(s.input_ids) for s in samples) * micro_batch)
    run = RunConfig(steps=steps, micro_batch=micro_batch, optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    with tempfile.TemporaryDirectory() as tmp:
        train(model, samples, lm_collate(processor, stage), functools.partial(lm_loss_fn, loss_chunk=stage.loss_chunk),
              count_label_tokens, run, tmp)
        return [row["step_time"] for row in read_metrics(Path(tmp) / "metrics.jsonl") if "step_time" in row]


def _loop_worker(spec: dict) -> dict:
    import torch

    from keye.models import build_model
    from keye.train.runner import BatchPlan

    samples, processor = nano_samples(spec["samples"])
    torch.manual_seed(0)
    model = build_model("keye-nano")
    plan = BatchPlan(len(samples), spec["micro_batch"], 1, 0, seed=0)
    steps = spec["steps"]
    if spec["loop"] == "bare":
        times = _bare_loop(model, samples, plan, steps, processor.tokenizer.pad_token_id)
    else:
        times = _keye_loop(model, samples, steps, spec["micro_batch"], processor, packed=spec["loop"] == "keye-packed")
    tokens = [sum(len(samples[i].input_ids) for i in plan.indices(step)) for step in range(steps)]
    step_s = statistics.median(times[1:])
    return {"step_s": step_s, "tokens_per_step": statistics.mean(tokens[1:]),
            "tokens_per_s": statistics.mean(tokens[1:]) / step_s, "peak_mib": _peak_rss() / MiB}


# ----------------------------------------------------------------------------- 2. memory against length


def packed_row(samples, length: int, pad_id: int):
    """One packed row of at most ``length`` tokens, filled with the samples in turn (repeating them)."""
    from keye.data.collate import collate_packed

    chosen, total, i = [], 0, 0
    while total + len(samples[i % len(samples)].input_ids) <= length:
        chosen.append(samples[i % len(samples)])
        total += len(chosen[-1].input_ids)
        i += 1
    batch = collate_packed(chosen, pad_id, length)
    assert batch["input_ids"].shape[0] == 1, "the samples did not fit one row"
    return batch


def _row_worker(spec: dict) -> dict:
    import torch

    from keye.data.collate import count_label_tokens
    from keye.models import build_model
    from keye.models.memory import activation_plan
    from keye.train.session import enable_activation_checkpointing
    from keye.train.stages.lm import lm_loss_fn

    samples, processor = nano_samples(48)
    batch = packed_row(samples, spec["length"], processor.tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = build_model("keye-nano").train()
    model.set_attn_implementation(spec["attention"])
    if spec["checkpointing"]:
        enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _reset_peak_rss()
    before = _peak_rss()
    start = time.perf_counter()
    lm_loss_fn(model, batch, loss_chunk=4096).loss_sum.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    added = _peak_rss() - before
    n_params = sum(p.numel() for p in model.parameters())
    patches = int(batch["video_grid_thw"].prod(-1).sum())
    plan = activation_plan(model.config, int(batch["attention_mask"].sum()), precision="fp32",
                           checkpointing=spec["checkpointing"], loss_chunk=4096,
                           label_tokens=count_label_tokens(batch), patches=patches)
    planned = plan.total + 4 * n_params + 8 * n_params  # activations, gradients, Adam's two moments
    return {"tokens": int(batch["attention_mask"].sum()), "samples": int(batch["segment_ids"].max()) + 1,
            "patches": patches, "step_s": seconds, "step_mib": added / MiB, "plan_mib": planned / MiB,
            "plan_error": planned / added - 1}


# ----------------------------------------------------------------------------- 3. GPU shapes


def train_flops(config, seqlens: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) on packed samples of ``seqlens``:
    2 per multiply-add of every matmul a token passes (the MoE's routed experts only), the LM head on every
    position, and causal attention inside each sample."""
    text = config.text_config
    D, H, Hk, L = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers
    d = getattr(text, "head_dim", None) or D // H
    attention = 2 * D * H * d + 2 * D * Hk * d
    if text.model_type == "qwen3_moe":
        mlp = text.num_experts_per_tok * 3 * D * text.moe_intermediate_size + D * text.num_experts
    else:
        mlp = 3 * D * text.intermediate_size
    tokens = sum(seqlens)
    per_token = L * (attention + mlp) + D * text.vocab_size
    causal = sum(n * n for n in seqlens) / 2  # query-key pairs each sample attends
    return 3 * (2 * tokens * per_token + 2 * 2 * causal * H * d * L)


def _gpu_worker(spec: dict) -> dict:
    import torch
    from transformers.utils import is_flash_attn_2_available

    from keye.models import build_config
    from keye.models.memory import activation_plan
    from keye.models.modeling import KeyeForConditionalGeneration
    from keye.train.session import enable_activation_checkpointing

    config = build_config(spec["variant"])
    config.text_config.num_hidden_layers = spec["layers"]
    config.vision_config.num_hidden_layers = 1  # text rows: the ViT only has to exist
    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        model = KeyeForConditionalGeneration(config).train()
    attention = "flash_attention_2" if is_flash_attn_2_available() else "varlen_sdpa"
    model.set_attn_implementation(attention)
    enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator().manual_seed(0)
    seqlens, total = [], 0
    while total < spec["length"]:  # samples of 512-4096 tokens, the last one cut to fill the row
        n = min(int(torch.randint(512, 4097, (1,), generator=g)), spec["length"] - total)
        seqlens.append(n)
        total += n
    ids = torch.randint(0, config.text_config.vocab_size - 1000, (1, total), generator=g)
    segments = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))[None]
    batch = {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                                           "segment_ids": segments}.items()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, sparse_logits=True, loss_chunk=4096, num_items_in_batch=1).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up; Adam's state exists from here on
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))
    busy = sum(getattr(e, "device_time_total", 0) for e in events) or 1
    kernels = [{"name": e.key[:90], "ms": getattr(e, "device_time_total", 0) / 1e3,
                "share": getattr(e, "device_time_total", 0) / busy} for e in events[:10]]
    step_s = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    plan = activation_plan(config, total, precision="bf16", checkpointing=True, loss_chunk=4096)
    planned = plan.total + 16 * n_params  # float32 weights, gradients and Adam's two moments
    name = torch.cuda.get_device_name()
    peak_flops = spec.get("peak") or next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = train_flops(config, seqlens)
    return {"device": name, "attention": attention, "tokens": total, "samples": len(seqlens), "step_s": step_s,
            "tokens_per_s": total / step_s, "tflops": flops / step_s / 1e12,
            "mfu": flops / step_s / peak_flops if peak_flops else None, "peak_gib": peak / 2**30,
            "plan_gib": planned / 2**30, "plan_error": planned / peak - 1, "kernels": kernels}


WORKERS = {"loop": _loop_worker, "row": _row_worker, "gpu": _gpu_worker}


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"threads": args.threads}
    if "loops" not in skip:
        result["loops"] = _run_loops(args)
    if "rows" not in skip:
        result["rows"] = _run_rows(args)
    if "gpu" not in skip:
        result["gpu"] = _run_gpu(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nfigures written to {args.out}")
    return 0


def _run_loops(args) -> list[dict]:
    samples = 4 * args.micro_batch * args.steps
    print(f"keye-nano on CPU, {args.threads} thread(s): {args.steps} steps of {args.micro_batch} video+text samples "
          "(median step after the first), each loop in a fresh process")
    print(f"{'loop':<34}{'tokens/s':>10}{'step s':>9}{'peak MiB':>10}{'vs bare':>9}")
    rows = []
    for loop, label in [("bare", "bare transformers loop (padded)"), ("keye-padded", "keye runner (padded)"),
                        ("keye-packed", "keye runner (packed rows)")]:
        out = _spawn({"kind": "loop", "loop": loop, "steps": args.steps, "micro_batch": args.micro_batch,
                      "samples": samples}, args.threads)
        out |= {"loop": loop}
        rows.append(out)
        if "error" in out:
            print(f"{label:<34} failed: {out['error'][-300:]}")
            continue
        ratio = out["tokens_per_s"] / rows[0]["tokens_per_s"] if "tokens_per_s" in rows[0] else float("nan")
        out["vs_bare"] = ratio
        print(f"{label:<34}{out['tokens_per_s']:>10.0f}{out['step_s']:>9.3f}{out['peak_mib']:>10.0f}{ratio:>8.2f}x")
    return rows


def _run_rows(args) -> list[dict]:
    print("\nOne training step of keye-nano on one packed row of video+text samples (CPU): the memory it adds, "
          "beside the memory plan (activations + gradients + Adam)")
    print(f"{'tokens':>8}{'samples':>8}{'attention':>13}{'ckpt':>6}{'step s':>9}{'step MiB':>10}{'plan MiB':>10}"
          f"{'error':>8}{'MiB/1K tok':>11}{'slope':>8}")
    print("(slope: MiB per 1K tokens added since the row above; the plan models the varlen path, not eager's L^2)")
    rows, previous = [], None
    cases = [(int(n), "varlen_sdpa", False) for n in args.lengths.split(",") if n]
    cases += [(int(n), "varlen_sdpa", True) for n in args.lengths.split(",") if n][-1:]
    cases += [(int(n), "eager", False) for n in args.dense_lengths.split(",") if n]
    for length, attention, checkpointing in cases:
        out = _spawn({"kind": "row", "length": length, "attention": attention, "checkpointing": checkpointing},
                     args.threads)
        out |= {"length": length, "attention": attention, "checkpointing": checkpointing}
        rows.append(out)
        if "error" in out:
            print(f"{length:>8} {attention} failed: {out['error'][-300:]}")
            continue
        same = previous is not None and (previous["attention"], previous["checkpointing"]) == (attention, checkpointing)
        slope = f"{(out['step_mib'] - previous['step_mib']) / (out['tokens'] - previous['tokens']) * 1024:.1f}" if same else "-"
        plan = (f"{out['plan_mib']:>10.0f}{out['plan_error']:>+8.0%}" if attention != "eager" else f"{'-':>10}{'-':>8}")
        print(f"{out['tokens']:>8}{out['samples']:>8}{attention:>13}{'yes' if checkpointing else 'no':>6}"
              f"{out['step_s']:>9.2f}{out['step_mib']:>10.0f}{plan}{out['step_mib'] / out['tokens'] * 1024:>11.1f}"
              f"{slope:>8}")
        previous = out
    return rows


def _run_gpu(args) -> list[dict] | dict:
    import torch

    if not torch.cuda.is_available():
        print("\nGPU rows (8B / 30B-A3B shapes, MFU): skipped, no CUDA GPU on this machine")
        return {"skipped": "no CUDA GPU"}
    variants = {"8b": "keye-vl-1.5-8b", "30b-a3b": "keye-vl-2.0-30b-a3b"}
    print("\nGPU: decoder cut to fit one GPU, bf16 autocast, packed text rows, activation checkpointing, chunked loss")
    print(f"{'shape':<22}{'tokens':>8}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>10}"
          f"{'error':>8}")
    rows = []
    for item in args.gpu_layers.split(","):
        size, layers = item.split("=")
        for length in (int(n) for n in args.gpu_lengths.split(",")):
            out = _spawn({"kind": "gpu", "variant": variants[size], "layers": int(layers), "length": length,
                          "steps": max(args.steps - 1, 3), "peak": args.peak_tflops and args.peak_tflops * 1e12},
                         args.threads)
            out |= {"shape": f"{size} ({layers} layers)", "length": length}
            rows.append(out)
            if "error" in out:
                print(f"{out['shape']:<22}{length:>8} failed: {out['error'][-300:]}")
                continue
            mfu = f"{out['mfu']:.0%}" if out["mfu"] is not None else "-"
            print(f"{out['shape']:<22}{out['tokens']:>8}{out['tokens_per_s']:>10.0f}{out['tflops']:>9.0f}{mfu:>7}"
                  f"{out['peak_gib']:>10.1f}{out['plan_gib']:>10.1f}{out['plan_error']:>+8.0%}")
            for k in out["kernels"][:5]:
                print(f"    {k['share']:>5.0%}  {k['name']}")
    return rows
