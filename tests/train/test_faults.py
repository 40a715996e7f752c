"""Runs that survive what users do to them: damaged checkpoints, two runs into one folder, Ctrl-C."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keye.errors import KeyeInputError, RunInterrupted
from keye.fileio import run_lock
from keye.train.checkpoint import latest_checkpoint
from keye.train.metrics import read_metrics
from keye.train.optim import OptimConfig
from keye.train.runner import RunConfig, train
from keye.train.session import stop_after_step

sys.path.insert(0, str(Path(__file__).parent))
from test_runner import TokenModel, collate, count_units, loss_fn, make_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run(folder, steps=6, save_every=2, loss=loss_fn):
    cfg = RunConfig(steps=steps, micro_batch=4, save_every=save_every, keep_checkpoints=5,
                    optim=OptimConfig(lr=0.05, warmup_steps=2))
    model = train(TokenModel(), make_dataset(), collate, loss, count_units, cfg, folder)
    return model.state_dict(), read_metrics(folder / "metrics.jsonl")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.safetensors", "state.json", "flipped byte"])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(tmp_path, damage, caplog):
    reference, ref_rows = run(tmp_path / "straight")
    folder = tmp_path / "damaged"
    run(folder, steps=4)  # checkpoints at steps 2 and 4
    newest = folder / "checkpoints" / "step_00000004"
    if damage == "flipped byte":  # same size, other content: only the checksum sees it
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    else:
        truncate(newest / damage)
    with caplog.at_level(logging.WARNING, logger="keye.train.checkpoint"):
        assert latest_checkpoint(folder).path.name == "step_00000002"
    named = damage if damage != "flipped byte" else "model.safetensors"
    assert any(str(newest / named) in r.getMessage() for r in caplog.records), caplog.text

    resumed, rows = run(folder)  # resumes at step 2, not from scratch, and reaches the same weights
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    drop = lambda r: {k: v for k, v in r.items() if k != "step_time"}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in ref_rows]


def test_the_manifest_lists_every_file_with_its_size_and_checksum(tmp_path):
    run(tmp_path, steps=2)
    checkpoint = latest_checkpoint(tmp_path)
    files = json.loads((checkpoint.path / "manifest.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    assert all(files[name]["bytes"] == (checkpoint.path / name).stat().st_size for name in files)
    (checkpoint.path / "rng.safetensors").unlink()
    with pytest.raises(KeyeInputError, match="rng.safetensors: missing"):
        checkpoint.verify()


def test_a_second_run_into_the_same_folder_stops_at_once_naming_the_first(tmp_path):
    """Another process holds the folder: the second run fails before writing anything; once the holder is
    gone (killed, so it never released anything itself) the lock is taken over."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from keye.fileio import run_lock
        with run_lock({str(tmp_path / 'run')!r}):
            print("holding", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(KeyeInputError, match=rf"another run is writing here \(pid {holder.pid} on "):
            with run_lock(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path / "run"):  # the dead holder's lock is simply taken over
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()


def test_a_second_keye_train_into_a_busy_run_root_stops_with_one_line(tmp_path, capsys):
    from keye.cli import main

    with run_lock(tmp_path / "run" / "stage0_vit"):  # as a first `keye train` running stage 0 holds it
        code = main(["train", str(ROOT / "pipelines" / "nano" / "stage0_vit.yaml"), "--run-root", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "another run is writing here" in err and "\n" not in err
    assert not (tmp_path / "run" / "stage0_vit" / "checkpoints").exists()


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_rerun_resumes(tmp_path, caplog):
    reference, ref_rows = run(tmp_path / "straight", save_every=0)
    calls = []

    def interrupt_during_step_3(model, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
        return loss_fn(model, batch)

    folder = tmp_path / "interrupted"
    # as in a terminal: a job started in the background of a shell inherits SIGINT ignored
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_after_step(), pytest.raises(RunInterrupted, match=r"stopped at step 3 of 6; checkpoint in .*resumes"):
            run(folder, save_every=0, loss=interrupt_during_step_3)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the block put Ctrl-C back
    finally:
        signal.signal(signal.SIGINT, outside)
    assert latest_checkpoint(folder).path.name == "step_00000003"
    with caplog.at_level(logging.INFO, logger="keye.train.session"):
        resumed, rows = run(folder, save_every=0)
    assert any("resumed from step 3" in r.getMessage() for r in caplog.records)
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    final = load_file(folder / "checkpoints" / "step_00000006" / "model.safetensors")
    assert final.keys() == reference.keys()
