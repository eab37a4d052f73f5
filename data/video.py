"""Video files: H.264 mp4 writing and reading with PyAV (it bundles FFmpeg and libx264)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, *, crf: int = 18) -> None:
    """Write (F, H, W, 3) frames, uint8 or float in [0, 1], as an H.264 (yuv420p) mp4.

    The file appears only once complete (written next to it, then renamed).
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even height and width, got {frames.shape[1:3]}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    os.replace(tmp, path)


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """(F, H, W, 3) uint8 frames and the frame rate of a video file."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames), fps
