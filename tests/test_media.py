"""mp4 read/write and the frames <-> [-1, 1] conversions."""

from __future__ import annotations

import numpy as np
import pytest

from tmdcli.artifacts.media import (
    MediaError,
    frames_to_uint8,
    read_mp4,
    uint8_to_frames,
    write_mp4,
    write_mp4_from_tensor,
)
from tmdcli.errors import UsageError


def smooth_clip(num_frames: int = 9, size: int = 32) -> np.ndarray:
    """[F, H, W, 3] uint8 gradients that move over time: every frame differs, nothing is sharp."""
    t = np.linspace(0, 1, num_frames)[:, None, None]
    y = np.linspace(0, 1, size)[None, :, None]
    x = np.linspace(0, 1, size)[None, None, :]
    red = 0.5 + 0.5 * np.sin(2 * np.pi * (x + t)) + 0 * y
    green = y + 0 * x + 0 * t
    blue = 0.2 + 0.6 * x * y + 0.2 * t
    return (np.stack([red, green, blue], axis=-1) * 255).round().clip(0, 255).astype(np.uint8)


def test_write_then_read_keeps_shape_and_pixels(tmp_path):
    frames = smooth_clip()
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=16)
    assert path == tmp_path / "clip.mp4"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left behind
    back = read_mp4(path)
    assert back.shape == (9, 32, 32, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(np.int16) - frames).mean() < 8
    # Frames stay in order: each decoded frame is closest to its own source frame.
    errors = np.abs(back[:, None].astype(np.int16) - frames[None]).mean(axis=(2, 3, 4))
    assert (errors.argmin(axis=1) == np.arange(9)).all()


def test_corrupt_or_missing_file_raises_media_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with pytest.raises(MediaError) as err:
        read_mp4(bad)
    assert isinstance(err.value, UsageError)
    with pytest.raises(MediaError):
        read_mp4(tmp_path / "absent.mp4")


def test_truncated_file_raises_media_error(tmp_path):
    path = write_mp4(smooth_clip(), tmp_path / "clip.mp4")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError):
        read_mp4(path)


def test_odd_size_needs_yuv444(tmp_path):
    frames = smooth_clip()[:, :31, :31]
    with pytest.raises(MediaError, match="even"):
        write_mp4(frames, tmp_path / "odd.mp4")
    assert read_mp4(write_mp4(frames, tmp_path / "odd.mp4", pixelformat="yuv444p")).shape == (9, 31, 31, 3)


def test_frames_to_uint8_accepts_both_layouts_and_rounds():
    video_3FHW = np.zeros((3, 2, 4, 5), dtype=np.float32)
    video_3FHW[0] = 1.0  # red channel white
    video_3FHW[1] = -1.0
    video_3FHW[2] = 0.0  # 127.5 rounds (half to even) to 128
    out = frames_to_uint8(video_3FHW)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (out[..., 2] == 128).all()
    np.testing.assert_array_equal(frames_to_uint8(np.moveaxis(video_3FHW, 0, -1)), out)
    # Out-of-range values clip instead of wrapping around.
    assert frames_to_uint8(np.full((3, 1, 2, 2), 3.0))[0, 0, 0, 0] == 255
    with pytest.raises(ValueError, match="ambiguous"):
        frames_to_uint8(np.zeros((3, 2, 2, 3)))
    assert frames_to_uint8(np.zeros((3, 2, 2, 3)), layout="CFHW").shape == (2, 2, 3, 3)
    with pytest.raises(ValueError, match="NaN"):
        frames_to_uint8(np.full((3, 1, 2, 2), np.nan))


def test_uint8_round_trip_through_floats():
    frames = smooth_clip(3, 8)
    floats = uint8_to_frames(frames)
    assert floats.shape == (3, 3, 8, 8) and floats.min() >= -1 and floats.max() <= 1
    np.testing.assert_array_equal(frames_to_uint8(floats), frames)


def test_tensor_input_bfloat16_and_writer(tmp_path):
    torch = pytest.importorskip("torch")
    frames = smooth_clip(5, 16)
    video = torch.from_numpy(uint8_to_frames(frames))
    np.testing.assert_array_equal(frames_to_uint8(video), frames)
    assert np.abs(frames_to_uint8(video.bfloat16()).astype(int) - frames).max() <= 2
    back = read_mp4(write_mp4_from_tensor(video, tmp_path / "t.mp4", fps=8))
    assert back.shape == (5, 16, 16, 3)
