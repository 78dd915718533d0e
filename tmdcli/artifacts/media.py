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


# --------------------------------------------------------------------------------------------------------------
# Finding ffmpeg (before any work: a missing binary would otherwise surface after minutes of sampling)

FFMPEG_FIX = ("pip install 'imageio-ffmpeg>=0.4.9' (its platform wheel carries an ffmpeg binary; 0.4.9's is 27 MB), "
              "or install a system ffmpeg and set IMAGEIO_FFMPEG_EXE=/path/to/ffmpeg")
_FFMPEG_FOUND: dict[str, str] = {}  # executable -> its `-version` line, so each process runs `ffmpeg -version` once


def find_ffmpeg() -> tuple[str, str]:
    """(executable, version line) of the ffmpeg imageio will run, as imageio-ffmpeg picks it: IMAGEIO_FFMPEG_EXE,
    else the binary in the imageio-ffmpeg wheel, else a conda or system ffmpeg on PATH. The binary is run once
    (`ffmpeg -version`) to prove it works. Raises MediaError (exit 2) with the fix when there is none."""
    import shutil
    import subprocess

    try:
        import imageio_ffmpeg  # imageio's ffmpeg plugin needs it even to drive a system ffmpeg
    except ImportError:
        raise MediaError("imageio-ffmpeg is not installed, so imageio cannot run ffmpeg", hint=FFMPEG_FIX) from None
    env_exe = os.environ.get("IMAGEIO_FFMPEG_EXE")
    if env_exe:
        exe = shutil.which(env_exe)  # a name on PATH or a path; None when missing or not executable
        if exe is None:
            raise MediaError(f"IMAGEIO_FFMPEG_EXE={env_exe} is not an executable ffmpeg",
                             hint="point it at an ffmpeg binary, or unset it to use imageio-ffmpeg's own; "
                                  + FFMPEG_FIX)
    else:
        try:
            exe = imageio_ffmpeg.get_ffmpeg_exe()
        except RuntimeError:  # no binary in the wheel (a platform without one) and none on the system
            raise MediaError("no ffmpeg found (imageio-ffmpeg carries no binary here and none is on PATH)",
                             hint=FFMPEG_FIX) from None
    if exe not in _FFMPEG_FOUND:
        try:
            out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MediaError(f"ffmpeg at {exe} does not run: {exc}", hint=FFMPEG_FIX) from None
        if out.returncode != 0:
            raise MediaError(f"ffmpeg at {exe} does not run (`-version` exit {out.returncode})", hint=FFMPEG_FIX)
        first = (out.stdout.splitlines() or ["ffmpeg (unknown version)"])[0]
        _FFMPEG_FOUND[exe] = first.split(" Copyright")[0].strip()
    return exe, _FFMPEG_FOUND[exe]


def ffmpeg_plan_row(*, required: bool) -> tuple[str, str]:
    """The plan's `ffmpeg` row for a stage that writes or reads mp4. Without one, a run that will work
    (`required`) stops here with exit 2; a dry run or an up-to-date stage shows what is missing instead, as plans
    do for a missing input."""
    try:
        exe, version = find_ffmpeg()
    except MediaError as exc:
        if required:
            raise
        return "ffmpeg", f"NOT FOUND: {exc.message} ({exc.hint}); a real run stops here with exit 2"
    return "ffmpeg", f"{exe} ({version})"


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

    from tmdcli.runtime.interrupts import sigint_point

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
            sigint_point("mp4")  # ffmpeg is running: where a Ctrl-C used to be lost (tests interrupt here)
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
