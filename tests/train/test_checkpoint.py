import random

import numpy as np
import pytest
import torch

from keye.errors import KeyeInputError
from keye.train.checkpoint import Checkpoint, TrainState, latest_checkpoint, load_model_state, save_checkpoint


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _save(tmp_path, model, opt, sched, state, **kwargs):
    return save_checkpoint(tmp_path, model.state_dict(), opt.state_dict(), sched.state_dict(), state, **kwargs)


def _restore(checkpoint, model, opt, sched):
    """What a training session does on resume: weights, RNG, then optimizer and schedule."""
    load_model_state(model, checkpoint.model_state(), checkpoint.path)
    checkpoint.restore_rng()
    opt.load_state_dict(checkpoint.optimizer_state())
    sched.load_state_dict(checkpoint.scheduler_state)
    return checkpoint.train_state


def _step(model, opt, sched):
    x = torch.randn(16, 4)  # draws from the global RNG, so RNG restore matters
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def test_resume_reproduces_uninterrupted_run(tmp_path):
    model, opt, sched = _setup()
    torch.manual_seed(1)
    reference = [_step(model, opt, sched) for _ in range(6)]

    model, opt, sched = _setup()
    torch.manual_seed(1)
    first = [_step(model, opt, sched) for _ in range(3)]
    random.random(), np.random.rand()
    _save(tmp_path, model, opt, sched, TrainState(step=3, data_position={"epoch": 0, "index": 48}))
    expected_py, expected_np = random.random(), np.random.rand()

    model, opt, sched = _setup(seed=123)  # fresh, different weights: everything must come from the checkpoint
    torch.manual_seed(999)
    state = _restore(latest_checkpoint(tmp_path), model, opt, sched)
    assert state.step == 3 and state.data_position == {"epoch": 0, "index": 48}
    assert random.random() == expected_py and np.random.rand() == expected_np
    resumed = first + [_step(model, opt, sched) for _ in range(3)]
    assert resumed == reference  # bitwise: same RNG, same optimizer moments, same schedule


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    model, opt, sched = _setup()
    _save(tmp_path, model, opt, sched, TrainState(step=1))
    (tmp_path / "checkpoints" / "step_00000002.tmp").mkdir()  # a write killed half-way
    assert latest_checkpoint(tmp_path).path.name == "step_00000001"


def test_prunes_old_checkpoints(tmp_path):
    model, opt, sched = _setup()
    for step in range(1, 5):
        _save(tmp_path, model, opt, sched, TrainState(step=step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000003", "step_00000004"]


def test_mismatched_model_is_a_clear_error(tmp_path):
    model, opt, sched = _setup()
    path = _save(tmp_path, model, opt, sched, TrainState(step=1))
    with pytest.raises(KeyeInputError, match="does not match the model"):
        _restore(Checkpoint(path), torch.nn.Linear(4, 1), opt, sched)
    with pytest.raises(KeyeInputError, match="not a checkpoint folder"):
        Checkpoint(tmp_path)
