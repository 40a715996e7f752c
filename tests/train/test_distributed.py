import json
from pathlib import Path

import pytest
import torch
from dist_launch import ROOT, launch

from keye.errors import ConfigError
from keye.train.distributed import DistConfig, build_strategy, shutdown_process_group
from keye.train.metrics import read_metrics

WORKER = Path(__file__).with_name("dist_worker.py")
RUNNER_WORKER = Path(__file__).with_name("runner_worker.py")


def _run(tmp_path, strategy, nproc, ds_config=None):
    out = tmp_path / f"{strategy}-{nproc}.json"
    launch([str(WORKER), strategy, str(out)] + ([str(ROOT / ds_config)] if ds_config else []), nproc)
    return json.loads(out.read_text())


def _run_runner(tmp_path, strategy, nproc, name="run", die_at_call=0, ds_config=None):
    out = tmp_path / f"{name}-{strategy}-{nproc}.json"
    args = [str(RUNNER_WORKER), strategy, str(tmp_path / f"{name}-{strategy}-{nproc}"), str(out), str(die_at_call)]
    args += [str(ROOT / ds_config)] if ds_config else []
    launch(args, nproc, fails=die_at_call > 0)
    return None if die_at_call else json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), "none", 1)


@pytest.mark.parametrize(
    "strategy, ds_config",
    [("ddp", None), ("fsdp2", None), ("deepspeed", "pipelines/deepspeed/zero2.json"), ("deepspeed", "pipelines/deepspeed/zero3.json")],
    ids=["ddp", "fsdp2", "zero2", "zero3"],
)
def test_two_processes_match_one(tmp_path, single, strategy, ds_config):
    result = _run(tmp_path, strategy, 2, ds_config)
    assert single["losses"][-1] < single["losses"][0]  # it trained
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    for key, value in single["state"].items():
        torch.testing.assert_close(torch.tensor(result["state"][key]), torch.tensor(value), rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "strategy, ds_config",
    [("ddp", None), ("fsdp2", None), ("deepspeed", "pipelines/deepspeed/zero2.json"),
     ("deepspeed", "pipelines/deepspeed/zero3.json")],
    ids=["ddp", "fsdp2", "zero2", "zero3"],
)
def test_runner_on_two_processes_matches_one_and_resumes(tmp_path, strategy, ds_config):
    """The runner splits each global batch over the ranks and reduces the loss: the same run as one process
    (the job ends cleanly through shutdown_process_group). Killed after its step-3 checkpoint and resumed,
    the 2-process run is the same again: weights, schedule and the optimizer's moments (gathered from the
    FSDP2 shards or ZeRO partitions into the checkpoint, by parameter name, and split again on load) come
    back; moments restarted from zero would change every later step."""
    single = _run_runner(tmp_path, "none", 1)
    result = _run_runner(tmp_path, strategy, 2, ds_config=ds_config)
    assert single["losses"][-1] < single["losses"][0]
    _run_runner(tmp_path, strategy, 2, name="cut", die_at_call=9, ds_config=ds_config)  # accumulation 2: step 5
    resumed = _run_runner(tmp_path, strategy, 2, name="cut", ds_config=ds_config)
    for run in (result, resumed):
        assert run["losses"] == pytest.approx(single["losses"], rel=1e-5)
        for key, value in single["state"].items():
            torch.testing.assert_close(torch.tensor(run["state"][key]), torch.tensor(value), rtol=1e-5, atol=1e-6, msg=key)


def test_shutdown_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    shutdown_process_group()  # no group: nothing to do
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        shutdown_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="'horovod' is not one of"):
        build_strategy(DistConfig(strategy="horovod"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_keye_train_stage_under_torchrun_matches_one_process(tmp_path, strategy):
    """`torchrun -m keye train <stage>` end to end on the real model, with stage 3 (two seeds trained,
    then averaged), the chunked loss and activation checkpointing: every rank trains its share, the seed
    models are averaged (sharded under FSDP2),
    rank 0 saves (sharded weights gathered first) while the others wait, and the job ends cleanly. The
    losses and the saved model equal a one-process run of the same global batch."""
    from safetensors.torch import load_file

    from keye.data.world import WorldConfig, generate_world

    generate_world(tmp_path / "world", WorldConfig.from_dict({"seed": 3, "clips": {"train": 8, "val": 0, "test": 0},
                   "scene": {"height": 56, "width": 56}, "crop_size": 56}), progress=False)
    stage = ROOT / "pipelines" / "nano" / "stage3_anneal.yaml"
    # the memory switches ride along: the head's loss in chunks recomputed in the backward (through the FSDP2
    # root's weights) and every block checkpointed
    common = ["init_from=null", "video.min_pixels=3136", "video.max_pixels=3136", "run.steps=3", "run.optim.warmup_steps=0",
              "data.max_samples=8", "loss_chunk=5", "run.activation_checkpointing=true"]
    runs = {}
    for name, nproc, extra in [("one", 1, ["run.micro_batch=4"]), ("two", 2, ["run.micro_batch=2", f"run.dist.strategy={strategy}"])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "world").symlink_to(tmp_path / "world")
        launch(["-m", "keye", "train", str(stage), "--run-root", str(tmp_path / name), *common, *extra], nproc)
        out = tmp_path / name / "stage3_anneal"
        runs[name] = ([r["loss"] for seed in ("seed_0", "seed_1") for r in read_metrics(out / seed / "metrics.jsonl")],
                      load_file(out / "model" / "model.safetensors"))
    assert len(runs["one"][0]) == 6 and runs["two"][0] == pytest.approx(runs["one"][0], rel=1e-5)
    assert runs["two"][1].keys() == runs["one"][1].keys()
    # Adam turns reduction-order noise in near-zero gradients (and an occasional flipped expert choice)
    # into whole-step differences: up to ~1e-3 at LR 3e-3, far below a wrong, missing or unaveraged shard
    for key, value in runs["one"][1].items():
        torch.testing.assert_close(runs["two"][1][key], value, rtol=0, atol=2e-3, msg=key)
