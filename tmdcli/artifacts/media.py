"""Video files: mp4 read/write through imageio's ffmpeg plugin, and frames <-> [-1, 1] tensors.

Convention: in memory a video is [3, F, H, W] float in [-1, 1] (what the Wan VAE reads and writes); on disk and
for viewing it is [F, H, W, 3] uint8. torch is imported only when a tensor is actually passed in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tmdcli.errors import UsageError


class MediaError(UsageError):
    """A video file that cannot be read or written (missing, corrupt, not a video)."""


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        got = f"{type(frames).__name__} {getattr(frames, 'dtype', '')}"
        raise ValueError(f"frames must be a uint8 numpy array, got {got}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must have shape [F, H, W, 3] with F >= 1, got {tuple(frames.shape)}")


def write_mp4(
    frames_uint8: np.ndarray,
    path: str | os.PathLike,
    fps: int = 16,
    *,
    crf: int = 10,
    pixelformat: str = "yuv420p",
) -> Path:
    """Write frames to an H.264 mp4, atomically (a temporary file in the same folder, then os.replace).

    Args:
        frames_uint8: [F, H, W, 3] uint8 RGB frames. H and W must be even for yuv420p.
        path: the mp4 to write; its folder must exist.
        fps: frames per second (Wan2.1 videos are 16 fps).
        crf: x264 constant rate factor; 0 is lossless, about 18 is visually lossless; 10 keeps metrics honest.
        pixelformat: "yuv420p" plays everywhere; "yuv444p" keeps full-resolution colour (tiny toy clips).

    Returns:
        `path`, as a Path.
    """
    import imageio.v2 as imageio  # lazy: keeps `import tmdcli.artifacts.media` cheap

    _check_frames(frames_uint8)
    height, width = frames_uint8.shape[1:3]
    if pixelformat == "yuv420p" and (height % 2 or width % 2):
        raise MediaError(
            f"yuv420p mp4 needs even frame sizes, got {height}x{width}", hint="crop or pad the frames, or use yuv444p"
        )
    path = Path(path)
    # Hidden name with the pid: never mistaken for a finished video, never shared by two processes.
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix or '.mp4'}")
    try:
        # macro_block_size=1: no silent resize to multiples of 16 (32x32 toy clips stay 32x32).
        writer = imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=None, pixelformat=pixelformat,
            macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", str(int(crf))],
        )
        try:
            for frame in frames_uint8:
                writer.append_data(np.ascontiguousarray(frame))
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise MediaError(f"cannot write video {path}: {exc}") from exc
        raise
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Read every frame of a video file.

    Returns:
        [F, H, W, 3] uint8 RGB.

    Raises:
        MediaError: the file is missing, unreadable, corrupt or holds no frames.
    """
    import imageio.v2 as imageio

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"no video file at {path}")
    try:
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            frames = [np.asarray(frame)[..., :3] for frame in reader]
        finally:
            reader.close()
    except Exception as exc:  # imageio/ffmpeg raise a mix of OSError, RuntimeError, IndexError, ValueError
        raise MediaError(f"cannot read video {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                         hint="the file is corrupt or not a video; regenerate it") from exc
    if not frames:
        raise MediaError(f"video {path} holds no frames", hint="the file is corrupt; regenerate it")
    return np.stack(frames).astype(np.uint8, copy=False)


def _to_numpy(video: Any) -> np.ndarray:
    """A numpy view of a numpy array or a torch tensor (any device, any dtype), without importing torch otherwise."""
    if isinstance(video, np.ndarray):
        return video
    if type(video).__module__.startswith("torch") and hasattr(video, "detach"):
        import torch  # only reached when the caller already holds a tensor

        tensor = video.detach().cpu()
        # numpy has no bfloat16; uint8 stays uint8.
        return (tensor if tensor.dtype == torch.uint8 else tensor.float()).numpy()
    return np.asarray(video)


def _to_fhwc(array: np.ndarray, layout: str | None) -> np.ndarray:
    """Move channels last; `layout` ("CFHW" or "FHWC") decides when both ends of the shape are 3."""
    if array.ndim != 4:
        raise ValueError(f"a video has 4 dims ([3, F, H, W] or [F, H, W, 3]), got shape {tuple(array.shape)}")
    if layout is None:
        first, last = array.shape[0] == 3, array.shape[-1] == 3
        if first and last:
            raise ValueError(f"ambiguous video shape {tuple(array.shape)}: pass layout='CFHW' or 'FHWC'")
        if not (first or last):
            raise ValueError(f"a video needs 3 channels first or last, got shape {tuple(array.shape)}")
        layout = "CFHW" if first else "FHWC"
    if layout == "CFHW":
        return np.moveaxis(array, 0, -1)
    if layout == "FHWC":
        return array
    raise ValueError(f"layout must be 'CFHW' or 'FHWC', got {layout!r}")


def frames_to_uint8(video: Any, *, layout: str | None = None) -> np.ndarray:
    """Convert a video in [-1, 1] to viewable frames.

    Args:
        video: a torch tensor or numpy array, [3, F, H, W] or [F, H, W, 3], float in [-1, 1] (values outside
            are clipped). A uint8 input is taken as already in [0, 255] and only transposed.
        layout: "CFHW" or "FHWC"; needed only when the shape is ambiguous (first and last dims both 3).

    Returns:
        [F, H, W, 3] uint8, C-contiguous; `round((x + 1) * 127.5)`.
    """
    frames = _to_fhwc(_to_numpy(video), layout)
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    frames = frames.astype(np.float32, copy=False)
    if not np.isfinite(frames).all():
        raise ValueError("the video holds NaN or infinite values")
    return np.ascontiguousarray(np.round((np.clip(frames, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8))


def uint8_to_frames(frames_uint8: np.ndarray) -> np.ndarray:
    """The inverse of `frames_to_uint8`: [F, H, W, 3] uint8 -> [3, F, H, W] float32 in [-1, 1] (VAE input)."""
    _check_frames(frames_uint8)
    return np.ascontiguousarray(np.moveaxis(frames_uint8.astype(np.float32) / 127.5 - 1.0, -1, 0))


def write_mp4_from_tensor(video_3FHW: Any, path: str | os.PathLike, fps: int = 16, **kwargs: Any) -> Path:
    """`write_mp4(frames_to_uint8(video), path, fps)` for a [3, F, H, W] video in [-1, 1]."""
    return write_mp4(frames_to_uint8(video_3FHW, layout="CFHW"), path, fps, **kwargs)
