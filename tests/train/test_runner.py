import pytest
import torch
from torch import nn

from keye.train.metrics import read_metrics
from keye.train.optim import OptimConfig
from keye.train.runner import RunConfig, StepLoss, train


class TokenModel(nn.Module):
    """Named like a Keye LM so the optimizer groups apply."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Embedding(11, 8)
        self.lm_head = nn.Linear(8, 11)


def make_dataset(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # variable lengths: a per-micro-batch mean would weight these unequally
    return [torch.randint(0, 11, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen) for _ in range(n)]


def collate(samples):
    return samples


def loss_fn(model, batch):
    total = 0.0
    for seq in batch:  # next-token prediction, summed over target tokens
        logits = model.lm_head(model.model(seq[:-1]))
        total = total + nn.functional.cross_entropy(logits, seq[1:], reduction="sum")
    return StepLoss(loss_sum=total)


def count_units(batch):
    return sum(len(seq) - 1 for seq in batch)


def run(tmp_path, steps=6, micro_batch=4, accum=1, name="run", loss=loss_fn, save_every=0):
    cfg = RunConfig(steps=steps, micro_batch=micro_batch, accum_steps=accum, save_every=save_every,
                    optim=OptimConfig(lr=0.05, warmup_steps=2))
    model = train(TokenModel(), make_dataset(), collate, loss, count_units, cfg, tmp_path / name)
    return model.state_dict(), read_metrics(tmp_path / name / "metrics.jsonl")


def test_loss_falls_and_curve_is_written(tmp_path):
    _, rows = run(tmp_path, steps=12)
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.9
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000012" / "model.safetensors").exists()


def test_periodic_eval_scores_the_weights_of_its_step_in_eval_mode(tmp_path):
    from safetensors.torch import load_file

    seen_modes = []

    def evaluate(model):
        seen_modes.append(model.training)
        head = model.lm_head.weight
        return {"head_sum": float(head.sum()), "head_sum/first_row": float(head[0].sum())}

    cfg = RunConfig(steps=6, micro_batch=4, save_every=2, keep_checkpoints=5, eval_every=2,
                    optim=OptimConfig(lr=0.05, warmup_steps=2))
    model = train(TokenModel(), make_dataset(), collate, loss_fn, count_units, cfg, tmp_path / "run", evaluate=evaluate)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_head_sum" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for row in evals:  # the figures of the weights saved at that step
        saved = tmp_path / "run" / "checkpoints" / f"step_{row['step']:08d}" / "model.safetensors"
        head = load_file(saved)["lm_head.weight"]
        assert row["eval_head_sum"] == pytest.approx(float(head.sum()), rel=1e-6)
        assert row["eval_head_sum/first_row"] == pytest.approx(float(head[0].sum()), rel=1e-6)
    assert len({r["eval_head_sum"] for r in evals}) == 3
    assert seen_modes == [False] * 3 and model.training  # scored in eval mode, handed back training
    assert (tmp_path / "run" / "eval.png").stat().st_size > 0


def test_accumulation_equals_large_batch(tmp_path):
    big, big_rows = run(tmp_path, micro_batch=4, accum=1, name="big")
    acc, acc_rows = run(tmp_path, micro_batch=1, accum=4, name="acc")
    for key in big:
        torch.testing.assert_close(acc[key], big[key], rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in acc_rows] == pytest.approx([r["loss"] for r in big_rows], rel=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
    full, full_rows = run(tmp_path, steps=6, name="full")

    calls = {"n": 0}

    def dies_in_step_5(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed after the step-3 checkpoint and one unsaved step
        return loss_fn(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, steps=6, name="cut", loss=dies_in_step_5, save_every=3)
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 4
    resumed, resumed_rows = run(tmp_path, steps=6, name="cut", save_every=3)
    assert [r["step"] for r in resumed_rows] == list(range(1, 7))  # step 4 logged once, not twice
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in full_rows]
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)


def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path):
    cfg = RunConfig(steps=12, micro_batch=4, precision="bf16", optim=OptimConfig(lr=0.05, warmup_steps=2))
    model = train(TokenModel(), make_dataset(), collate, loss_fn, count_units, cfg, tmp_path / "bf16")
    rows = read_metrics(tmp_path / "bf16" / "metrics.jsonl")
    _, fp32_rows = run(tmp_path, steps=1, name="fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert rows[0]["loss"] == pytest.approx(fp32_rows[0]["loss"], rel=2e-2)  # same batch, bf16 matmuls
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.9


def test_device_and_precision_settings_are_checked(tmp_path):
    from keye.errors import ConfigError
    from keye.train.session import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="run.device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="run.precision: 'fp8'"):  # when the config is read, before any run
        RunConfig(steps=1, micro_batch=4, precision="fp8")


def test_to_device_moves_every_nested_tensor_and_nothing_else():
    from keye.train.session import to_device

    t = torch.ones(2)
    moved = to_device({"pixels": t, "parts": [t, (t, 3)], "name": "clip"}, torch.device("meta"))
    assert moved["pixels"].is_meta and moved["parts"][0].is_meta and moved["parts"][1][0].is_meta
    assert moved["parts"][1][1] == 3 and moved["name"] == "clip" and isinstance(moved["parts"][1], tuple)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_matches_cpu_run_and_hands_the_model_back_on_cpu(tmp_path):
    cpu, cpu_rows = run(tmp_path, name="cpu")
    cfg = RunConfig(steps=6, micro_batch=4, device="cuda", optim=OptimConfig(lr=0.05, warmup_steps=2))
    model = train(TokenModel(), make_dataset(), collate, loss_fn, count_units, cfg, tmp_path / "gpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    gpu_rows = read_metrics(tmp_path / "gpu" / "metrics.jsonl")
    assert [r["loss"] for r in gpu_rows] == pytest.approx([r["loss"] for r in cpu_rows], rel=1e-3)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, cpu[key], rtol=1e-3, atol=1e-4)


def test_dataloader_workers_give_the_same_run(tmp_path):
    inline, inline_rows = run(tmp_path, name="inline")
    cfg = RunConfig(steps=6, micro_batch=4, num_workers=2, optim=OptimConfig(lr=0.05, warmup_steps=2))
    model = train(TokenModel(), make_dataset(), collate, loss_fn, count_units, cfg, tmp_path / "workers")
    rows = read_metrics(tmp_path / "workers" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in inline_rows]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, inline[key], rtol=0, atol=0)


def test_dataloader_workers_report_the_samples_they_skipped(tmp_path):
    """Bad samples skipped in the workers are counted in the main process as without workers."""
    from keye.data.conversations import SkipBadSamples
    from keye.errors import KeyeInputError

    def load(seq):
        if int(seq[0]) == 3:  # about one sample in eleven: "undecodable"
            raise KeyeInputError(f"sample starting with {int(seq[0])}: cannot decode")
        return seq

    counts = {}
    for workers in (0, 2):
        dataset = SkipBadSamples(make_dataset(), load)
        cfg = RunConfig(steps=6, micro_batch=4, num_workers=workers, optim=OptimConfig(lr=0.05, warmup_steps=2))
        train(TokenModel(), dataset, collate, loss_fn, count_units, cfg, tmp_path / f"w{workers}")
        counts[workers] = (dict(dataset.skipped), len(dataset.errors))
    assert counts[0][0].get("KeyeInputError", 0) > 0
    assert counts[2] == counts[0]
