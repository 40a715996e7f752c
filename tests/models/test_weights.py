"""Weights come from safetensors only: a pickle-only folder is refused (nothing is unpickled) with the
conversion to do, and a truncated weights file is named, by keye.load, keye ask and a stage's init_from."""

from pathlib import Path

import pytest
import torch

import keye
from keye.cli import main
from keye.errors import KeyeInputError
from keye.models import build_model
from keye.processing import load_nano_processor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from keye.video.synthetic import write_cut_clip

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_model("keye-nano")
    model.save_pretrained(root / "ckpt")
    load_nano_processor().save_pretrained(root / "ckpt")
    write_cut_clip(root / "clip.mp4", num_frames=4, height=56, width=56, cuts=())
    return root / "ckpt", model


def clip_of(saved) -> str:
    return str(saved[0].parent / "clip.mp4")


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def test_a_pickle_only_folder_is_refused_without_unpickling(saved, tmp_path, monkeypatch, capsys):
    folder, model = saved
    pickled = _copy(folder, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(KeyeInputError, match=r"holds only pickled weights \(pytorch_model.bin\).*safetensors"):
        keye.load(pickled, device="cpu")
    assert main(["ask", clip_of(saved), "Why?", "--model", str(pickled), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pytorch_model.bin" in err and "\n" not in err
    from keye.recipe import load_stage_config
    from keye.train.base import load_start

    cfg = load_stage_config(Path(__file__).resolve().parents[2] / "pipelines" / "nano" / "sft.yaml",
                            [f"init_from={pickled}"])
    with pytest.raises(KeyeInputError, match="holds only pickled weights"):
        load_start(cfg, tmp_path)


def test_a_truncated_weights_file_is_named(saved, tmp_path, capsys):
    folder, _ = saved
    broken = _copy(folder, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KeyeInputError, match=r"broken/model.safetensors: not a readable safetensors file, truncated"):
        keye.load(broken, device="cpu")
    assert main(["ask", clip_of(saved), "Why?", "--model", str(broken), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and "truncated" in err and "\n" not in err


def test_an_intact_folder_still_loads_to_the_same_weights(saved):
    folder, model = saved
    pipe = keye.load(folder, device="cpu", dtype="float32")
    for key, value in model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[key], value), key
