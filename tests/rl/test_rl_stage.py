"""The RL stage on keye-nano and a two-clip world: log-probs, a GSPO run that learns, resume, LoRA."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keye.data.world import SceneConfig, WorldConfig, generate_world
from keye.models import build_model
from keye.processing import load_nano_processor
from keye.train.metrics import read_metrics
from keye.train.rewards import REWARDS
from keye.cli import main
from keye.recipe import load_stage_config
from keye.train.rl_losses import masked_mean_B
from keye.train.session import TrainSession
from keye.train.stages.rl import (PromptBuilder, RLStage, _with_world_listings, collate_prompts, completion_logps,
                                  cut_at_eos, group_advantages, held_out_figures)
from keye.video import VideoOptions

RECIPE = Path(__file__).parents[2] / "pipelines" / "nano" / "rl.yaml"
TINY = [  # small enough for two shared CPU cores; the rest comes from the nano recipe
    "init_from=null", "data.train=[world/train.jsonl]", "data.eval=[]", "data.reasoning_only=false",
    "video={fps: 2.0, max_frames: 2, slow_fast: false, min_pixels: 3136, max_pixels: 3136}", "rollout.max_new_tokens=3",
    "run.micro_batch=4", "router_aux=true",
]
LETTERS = set("aeiou")
FAST_START_ID = load_nano_processor().tokenizer.convert_tokens_to_ids("<|fast_start|>")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    scene = SceneConfig(height=56, width=56, fps=2.0, durations=(3.0, 4.0))
    generate_world(root / "world", WorldConfig(seed=1, scene=scene, clips={"train": 2, "val": 0, "test": 0},
                                               questions_per_clip=2, zoom_per_clip=0), progress=False)
    return root


@pytest.fixture(scope="module")
def processor():
    return load_nano_processor()


def _rows(world):
    return [json.loads(line) for line in (world / "world" / "train.jsonl").read_text().splitlines()]


def vowel_share(prompts, completions, **_):
    """A reward a random policy already varies on: the share of vowels among the letters it writes."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in LETTERS for ch in letters) / len(letters) if letters else 0.0)
    return out


@torch.no_grad()
def _seq_logps(model, processor, groups) -> torch.Tensor:
    """Mean per-token log-prob of every completion in ``groups`` under ``model``, (N,)."""
    prompts = [g.prompt for g in groups for _ in g.completions]
    batch = collate_prompts(prompts, processor.tokenizer.pad_token_id, [c for g in groups for c in g.completions])
    logps_BT = completion_logps(model.eval(), batch, temperature=1.0)[0]
    return masked_mean_B(logps_BT, batch["completion_mask"])


def test_completion_logps_equal_generation_scores_batched_and_alone(world, processor):
    torch.manual_seed(0)
    model = build_model("keye-nano").eval()
    builder = PromptBuilder(processor, VideoOptions(max_frames=2, max_pixels=3136), world / "world")
    prompts = [builder(r) for r in _rows(world)[:2]]
    assert all(p.input_ids_L.tolist().count(FAST_START_ID) == 1 for p in prompts)  # Slow-Fast: one fast frame each
    assert len(prompts[0].input_ids_L) != len(prompts[1].input_ids_L)  # the batch really pads
    pad, eos = processor.tokenizer.pad_token_id, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = collate_prompts(prompts, pad)
    out = model.generate(**batch, do_sample=False, max_new_tokens=5, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=pad, eos_token_id=eos)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    step_logps = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
    completions = cut_at_eos(new, eos)
    together = completion_logps(model, collate_prompts(prompts, pad, completions), temperature=1.0)[0]
    for b, c in enumerate(completions):
        alone = completion_logps(model, collate_prompts([prompts[b]], pad, [c]), temperature=1.0)[0][0]
        torch.testing.assert_close(together[b, : len(c)], alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(together[b, : len(c)], step_logps[b, : len(c)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_gspo_moves_probability_to_rewarded_completions(world, processor, monkeypatch, device):
    """A few GSPO steps through the real loop: the completions it was rewarded for became more
    likely, the penalised ones less; frozen groups did not move; the MoE router loss took part."""
    monkeypatch.setitem(REWARDS, "vowels", vowel_share)
    cfg = load_stage_config(RECIPE, TINY + [
        "rewards={vowels: 1.0}", "hints.enabled=false", "zero_variance=filter", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "minibatch_size=4", "run.steps=3", "run.save_every=0",
        "run.optim={lr: 3.0e-3, schedule: constant}", f"out=learn_{device}", f"run.device={device}",
    ])
    torch.manual_seed(0)
    model = build_model("keye-nano")
    start = copy.deepcopy(model)
    stage = RLStage(cfg, world, model, processor, resume=False)
    seen, sample = [], stage.sample

    def recording(rows, level=0):
        groups = sample(rows, level)
        seen.extend(groups)
        return groups

    stage.sample = recording
    stage.run()
    assert next(model.parameters()).device.type == device
    model.cpu()

    adv = torch.cat([group_advantages(g.rewards_G) for g in seen if not g.zero_variance])
    kept = [g for g in seen if not g.zero_variance]
    moved = _seq_logps(model, processor, kept) - _seq_logps(start, processor, kept)
    assert len(adv) >= 8
    assert moved[adv > 0].mean() > moved[adv < 0].mean() + 0.1, (moved, adv)
    assert torch.corrcoef(torch.stack([moved, adv]))[0, 1] > 0.3  # >= 0.48 over run seeds 0-5 on CPU
    if device == "cpu":  # on these draws both sides move: >= 0.11 up / <= -0.18 down over run seeds 0-5.
        # A GPU samples other completions; there the rewarded ones can take the penalised ones up with them.
        assert moved[adv > 0].mean() > 0.05 and moved[adv < 0].mean() < -0.05, (moved, adv)

    after, before = model.state_dict(), start.state_dict()
    for name, value in before.items():
        if name.startswith(("visual.", "mlp_AR.")):
            assert torch.equal(value, after[name]), f"frozen {name} changed"
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    rows = read_metrics(stage.out_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    logged = {k for r in rows for k in r}
    assert {"reward_mean", "reward_std", "clip_fraction", "entropy", "response_length", "loss", "router_aux"} <= logged
    assert all(r["router_aux"] > 0 for r in rows if "router_aux" in r)


def test_rl_rejects_the_supervised_runners_batch_options():
    from keye.errors import ConfigError

    with pytest.raises(ConfigError, match="run.precision: the RL stage runs in fp32"):
        load_stage_config(RECIPE, TINY + ["run.precision=bf16"])
    with pytest.raises(ConfigError, match="run.num_workers"):
        load_stage_config(RECIPE, TINY + ["run.num_workers=2"])
    with pytest.raises(ConfigError, match="'none', 'ddp' or 'fsdp2' \\(got 'deepspeed'\\)"):
        load_stage_config(RECIPE, TINY + ["run.dist.strategy=deepspeed"])


def test_resume_equals_uninterrupted_with_lora_on_experts(world, processor, monkeypatch, tmp_path):
    monkeypatch.setitem(REWARDS, "vowels", vowel_share)
    (tmp_path / "world").symlink_to(world / "world")
    common = TINY + [
        "rewards={vowels: 1.0, repetition: 0.5}", "hints.enabled=false", "zero_variance=keep",
        "rollout.prompts_per_step=1", "rollout.group_size=3", "minibatch_size=3", "run.optim={lr: 1.0e-2}",
        "lora={enabled: true, r: 2, alpha: 4}", "run.save_every=1", "run.keep_checkpoints=3",
    ]
    args = ["train", str(RECIPE), "--run-root", str(tmp_path), *common, "run.steps=2", "data.eval=[world/train.jsonl]"]
    assert main(args + ["out=straight"]) == 0

    class Killed(Exception):
        pass

    def save_then_die(session):
        real_save(session)
        if session.state.step == 1:
            raise Killed  # the process dies right after its first checkpoint

    real_save = TrainSession.save
    monkeypatch.setattr(TrainSession, "save", save_then_die)
    with pytest.raises(Killed):
        main(args + ["out=resumed"])
    monkeypatch.setattr(TrainSession, "save", real_save)
    assert main(args + ["out=resumed"]) == 0  # the same command again picks up the step-1 checkpoint

    straight = load_file(tmp_path / "straight/checkpoints/step_00000002/model.safetensors")
    resumed = load_file(tmp_path / "resumed/checkpoints/step_00000002/model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    a = read_metrics(tmp_path / "straight/metrics.jsonl")
    b = read_metrics(tmp_path / "resumed/metrics.jsonl")
    drop = lambda r: {k: v for k, v in r.items() if k != "step_time"}  # noqa: E731
    assert [drop(r) for r in a] == [drop(r) for r in b]
    held_out = [json.loads((tmp_path / out / "eval.json").read_text()) for out in ("straight", "resumed")]
    assert held_out[0] == held_out[1] and held_out[0]["n"] == len(_rows(world))
    answers = [json.loads(line) for line in (tmp_path / "straight" / "eval_answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in answers) == sorted(r["id"] for r in _rows(world))
    assert held_out[0]["accuracy"] == sum(a["correct"] for a in answers) / len(answers)
    assert (tmp_path / "resumed" / "model" / "config.json").is_file()  # LoRA merged into a plain saved model

    # only the adapters trained, the expert adapters included; the base weights stayed where they started
    torch.manual_seed(0)
    fresh = build_model("keye-nano").state_dict()
    lora = [k for k in straight if "lora_" in k]
    assert any("experts" in k for k in lora)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in straight.items() if "lora_" not in k}
    assert base.keys() == fresh.keys()
    for key, value in fresh.items():
        assert torch.equal(value, base[key]), key
    init_b = [k for k in lora if "lora_B" in k]  # peft starts B at zero, so a non-zero B was trained
    assert any(straight[k].abs().sum() > 0 for k in init_b)


def test_micro_batching_does_not_change_the_update(world, processor, monkeypatch):
    """Sequence-mean aggregation is split exactly across micro-batches: one forward of 8 sequences and
    eight forwards of 1 give the same gradient (left padding differs, so up to float tolerance). The MoE
    router loss is off here: it is a per-forward mean of a non-linear statistic, not a sum over sequences."""
    monkeypatch.setitem(REWARDS, "vowels", vowel_share)
    cfg = load_stage_config(RECIPE, TINY + [
        "rewards={vowels: 1.0}", "hints.enabled=false", "zero_variance=keep", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "minibatch_size=8", "router_aux=false", "out=micro",
        "video={fps: 2.0, max_frames: 2, slow_fast: true, max_pixels: 3136}",  # a slow and a fast frame
    ])
    torch.manual_seed(0)
    stage = RLStage(cfg, world, build_model("keye-nano"), processor, resume=False)
    groups, _, _ = stage.rollout(0)
    grads = []

    def capture(model, optimizer):  # record instead of stepping, so both passes see the same weights
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return 0.0

    monkeypatch.setattr(stage.session.strategy, "step", capture)
    for micro_batch in (8, 1):
        stage.cfg.run.micro_batch = micro_batch
        stage.update(groups, step=0)
    assert len(grads) == 2 and grads[0].keys() == grads[1].keys()
    assert sum(float(g.abs().sum()) for g in grads[0].values()) > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_ddp_ranks_with_unequal_rollouts_stay_in_step(world, tmp_path):
    """Rank 1 keeps one group fewer than rank 0 (as zero-variance dropping does): both ranks still take the
    same optimizer steps (the old loop let rank 0 take one more and wait for ever), the replicas end
    identical and they trained."""
    from safetensors.torch import load_file
    from dist_launch import launch

    (tmp_path / "world").symlink_to(world / "world")
    overrides = TINY + [
        "rewards={vowels: 1.0}", "hints.enabled=false", "zero_variance=keep", "rollout.prompts_per_step=2",
        "rollout.group_size=3", "minibatch_size=3", "run.micro_batch=2", "run.steps=2", "run.save_every=0",
        "run.optim={lr: 1.0e-2}", "run.dist.strategy=ddp",
    ]
    launch([str(Path(__file__).with_name("rl_worker.py")), str(tmp_path), *overrides], nproc=2, timeout=240)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert int(ranks[0].pop("moved")) > 0 and int(ranks[1].pop("moved")) > 0
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    # held-out eval: each rank generated for its own half of the rows, and the summed counts equal
    # one rank scoring every row
    evals = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in (0, 1)]
    assert len(evals[0]["rows"]) > 1 and evals[0]["rows"] == evals[1]["rows"]
    assert sorted(evals[0]["scored"] + evals[1]["scored"]) == sorted(evals[0]["rows"])
    assert evals[0]["scored"] and evals[1]["scored"]
    for e in evals:
        assert e["split"] == e["whole"]


def test_fsdp2_on_two_ranks_equals_one_process(world, tmp_path):
    """GSPO under FSDP2: each rank rolls out half of every step's prompts on weights gathered from the shards,
    and the sharded update over both halves equals one process's over all of them (weights, held-out eval).
    Rollouts are seeded per prompt draw so both runs sample the same completions; step 2 samples from the
    weights step 1 trained, so stale gathered weights would show. The router loss is off: it is a per-forward
    mean, not a sum over sequences, so it depends on how sequences share micro-batches."""
    from dist_launch import launch

    (tmp_path / "world").symlink_to(world / "world")
    worker = str(Path(__file__).with_name("rl_sharded_worker.py"))
    common = TINY + ["rewards={vowels: 1.0}", "hints.enabled=false", "zero_variance=keep", "rollout.group_size=3",
                     "run.micro_batch=3", "run.steps=2", "run.save_every=0", "run.optim={lr: 1.0e-2}",
                     "router_aux=false"]
    launch([worker, str(tmp_path), str(tmp_path / "one"), *common, "rollout.prompts_per_step=2", "minibatch_size=6",
            "out=one"], nproc=1, timeout=240)
    launch([worker, str(tmp_path), str(tmp_path / "two"), *common, "rollout.prompts_per_step=1", "minibatch_size=3",
            "run.dist.strategy=fsdp2", "out=two"], nproc=2, timeout=240)
    one, two = (load_file(tmp_path / f"{name}.safetensors") for name in ("one", "two"))
    runs = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two")]
    assert runs[0]["moved"] > 0 and runs[0]["moved"] == runs[1]["moved"]
    assert runs[0]["eval"] == runs[1]["eval"] and runs[0]["eval"]["n"] == len(_rows(world))
    assert one.keys() == two.keys()
    # every weight moved ~1.5e-2 in the two steps (lr 1e-2); the runs differ by <= 1.2e-4 (measured on CPU, in the
    # embedding rows that got near-zero gradients, where Adam turns reduction-order noise into whole steps)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=5e-4, msg=key)


def test_held_out_rows_get_the_frame_listings_the_world_writes(world):
    """Held-out clips have no frame rows, so the eval regenerates their listings from the world's config; on
    train clips, which have frame rows, the regenerated listing is the written one."""
    written = {json.loads(line)["clip_id"]: json.loads(line)["frame_texts"]
               for line in (world / "world" / "frames.jsonl").read_text().splitlines()}
    rows = _with_world_listings(_rows(world), world / "world")
    assert {r["clip_id"] for r in rows} == set(written)
    for row in rows:
        assert row["frame_texts"] == written[row["clip_id"]]
    assert _with_world_listings(_rows(world), world) == _rows(world)  # no world.json there: rows as they are


def test_held_out_figures_pool_the_placement_claims():
    def record(kind, correct, claims, right):
        return {"kind": kind, "correct": correct, "formatted": True, "claims": claims, "claims_right": right}

    figures = held_out_figures([record("count", True, 3, 2), record("count", False, 1, 0), record("order", True, 0, 0),
                                record("order", False, 4, None)])  # the last has no listing to check against
    assert figures["accuracy"] == 0.5 and figures["per_kind"] == {"count": 0.5, "order": 0.5}
    assert figures["claims_per_answer"] == 2.0 and figures["claims_right"] == 2 / 4
    assert held_out_figures([record("count", True, 0, 0)])["claims_right"] is None
