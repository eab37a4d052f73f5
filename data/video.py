"""Video files: H.264 mp4 writing and reading with PyAV (it bundles FFmpeg and libx264); and still
images, read with Pillow as one-frame clips (`load_image`)."""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 18) -> None:
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
        # Any frame rate, 29.97 included (PyAV takes an int or a Fraction).
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    os.replace(tmp, path)


def write_contact_sheet(
    path: str | os.PathLike, videos: np.ndarray, captions: Sequence[str], *, scale: int = 4
) -> None:
    """Write a PNG with one row per video, (B, F, H, W, 3) uint8 or float in [0, 1]: its frames
    side by side, enlarged `scale` times (nearest pixel), its caption under the row. The file
    appears only once complete."""
    from PIL import Image, ImageDraw

    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or len(captions) != len(videos):
        raise ValueError(f"videos must be (B, F, H, W, 3) with B captions, got {videos.shape}")
    if videos.dtype != np.uint8:
        videos = (np.clip(videos, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    b, f, h, w, _ = videos.shape
    h, w, gap, text = h * scale, w * scale, 2, 14  # pixels
    sheet = Image.new("RGB", (f * (w + gap) + gap, b * (h + text + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (clip, caption) in enumerate(zip(videos, captions, strict=True)):
        top = gap + i * (h + text + gap)
        for j, frame in enumerate(clip):
            tile = Image.fromarray(frame).resize((w, h), Image.NEAREST)
            sheet.paste(tile, (gap + j * (w + gap), top))
        draw.text((gap, top + h + 1), caption, fill="black")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial.png")
    sheet.save(tmp, format="PNG")
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


class BadClip(Exception):
    """A video file that cannot give a clip: unreadable, truncated, or too short. The message
    names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def allowed_frames(max_frames: int, frame_multiple: int) -> int:
    """The largest k * frame_multiple + 1 <= max_frames (the 4k+1 rule; 8k+1 for CogVideoX 1.5)."""
    if frame_multiple < 1 or max_frames < 1:
        raise ValueError(
            f"need frame_multiple >= 1 and max_frames >= 1, got {frame_multiple}, {max_frames}"
        )
    return (max_frames - 1) // frame_multiple * frame_multiple + 1


def sample_indices(source_fps: float, fps: float, count: int) -> np.ndarray:
    """Source frame indices of `count` frames taken at `fps` from the start of a clip recorded at
    `source_fps`: every (source_fps / fps)-th frame, or consecutive frames when the source is
    slower than the target."""
    step = max(source_fps / fps, 1.0) if source_fps > 0 else 1.0
    return np.floor(np.arange(count) * step + 1e-6).astype(np.int64)


def choose_bucket(
    num_available: int, height: int, width: int, buckets: Sequence[tuple[int, int, int]]
) -> tuple[int, int, int] | None:
    """Among the (F, H, W) buckets with F <= num_available, the one whose aspect ratio is nearest
    the clip's (|log ratio|), then the one with the most frames, then the first listed. None if
    the clip is shorter than every bucket."""
    fits = [b for b in buckets if b[0] <= num_available]
    if not fits:
        return None
    aspect = math.log(width / height)
    return min(fits, key=lambda b: (round(abs(math.log(b[2] / b[1]) - aspect), 9), -b[0]))


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(F, h, w, 3) uint8 -> (F, height, width, 3) uint8: scaled, aspect kept, so that the target
    is covered (area averaging when shrinking, bicubic when enlarging), then centre-cropped."""
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (rh - height) // 2, (rw - width) // 2
    box = (left, top, left + width, top + height)
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    out = [np.asarray(Image.fromarray(f).resize((rw, rh), method).crop(box)) for f in frames]
    return np.stack(out)


def load_clip(
    path: str | os.PathLike,
    *,
    fps: float,
    max_frames: int | None = None,
    frame_multiple: int = 4,
    size: tuple[int, int] | str | None = None,
    buckets: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file, sampled at `fps` from its start.

    F is the largest k * frame_multiple + 1 (k >= 1) the clip can supply, at most `max_frames`,
    and (H, W) = `size`, or with size="native" the clip's own height and width, each cropped
    down to a multiple of NATIVE_MULTIPLE (`native_size`); or, with `buckets` ((F, H, W)
    triples), the clip goes to the bucket
    chosen by `choose_bucket` and takes its F, H and W. Frames are resized and centre-cropped
    by `resize_crop`. Raises BadClip for a file PyAV cannot decode, one that decodes to fewer
    frames than its container declares (truncated) or to none, and one too short for the
    smallest allowed frame count; clips are never padded.
    """
    if (size is None) == (buckets is None):
        raise ValueError("pass exactly one of size=(H, W) and buckets=[(F, H, W), ...]")
    if buckets is not None:
        for b in buckets:
            if (b[0] - 1) % frame_multiple or b[0] < 1 + frame_multiple:
                raise ValueError(f"bucket {b}: frames must be k * {frame_multiple} + 1, k >= 1")
        top = max(b[0] for b in buckets)
    else:
        if max_frames is None:
            raise ValueError("size=(H, W) needs max_frames")
        top = allowed_frames(max_frames, frame_multiple)
        if top < 1 + frame_multiple:
            raise ValueError(f"max_frames ({max_frames}) is below {1 + frame_multiple}")
    frames, source_fps = _decode_frames(path, fps, top)
    if buckets is not None:
        bucket = choose_bucket(len(frames), *frames.shape[1:3], buckets)
        if bucket is None:
            short = min(b[0] for b in buckets)
            raise BadClip(path, f"too short: {len(frames)} frames at {fps} fps, need {short}")
        count, height, width = bucket
    else:
        count = allowed_frames(len(frames), frame_multiple)
        if count < 1 + frame_multiple:
            raise BadClip(
                path, f"too short: {len(frames)} frames at {fps} fps, need {1 + frame_multiple}"
            )
        height, width = native_size(*frames.shape[1:3]) if size == NATIVE else size
        if min(height, width) < NATIVE_MULTIPLE:
            raise BadClip(path, f"too small: {frames.shape[1]}x{frames.shape[2]} pixels")
    return resize_crop(frames[:count], height, width)


NATIVE = "native"
# Native sizes are cropped to multiples of 16: the VAEs' 8x spatial compression times the
# transformer's 2x2 patches, so that every clip is a whole number of patch tokens.
NATIVE_MULTIPLE = 16


def native_size(height: int, width: int) -> tuple[int, int]:
    """A clip's own (height, width), each rounded down to a multiple of NATIVE_MULTIPLE."""
    m = NATIVE_MULTIPLE
    return height // m * m, width // m * m


def _decode_frames(path, fps: float, count: int) -> tuple[np.ndarray, float]:
    """Up to `count` frames sampled at `fps` (fewer if the clip ends first) and the source fps.
    The whole stream is decoded, so that a truncated file is noticed."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadClip(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            source_fps = float(stream.average_rate or stream.guessed_rate or 0)
            wanted = sample_indices(source_fps, fps, count)
            position = {int(i): k for k, i in enumerate(wanted)}
            kept, decoded = {}, 0
            for frame in container.decode(stream):
                if decoded in position:
                    kept[position[decoded]] = frame.to_ndarray(format="rgb24")
                decoded += 1
            declared = stream.frames
    except av.FFmpegError as e:
        raise BadClip(path, f"unreadable ({type(e).__name__}: {e})") from e
    if decoded == 0:
        raise BadClip(path, "no frames decoded")
    if declared and decoded < declared:
        raise BadClip(path, f"truncated: decoded {decoded} of the {declared} frames declared")
    n = len(kept)  # frames 0..n-1 of `wanted` exist: the indices increase
    return np.stack([kept[k] for k in range(n)]), source_fps


class BadImage(BadClip):
    """An image that cannot give a one-frame clip: unreadable, truncated, or too small. The
    message names the file (or WebDataset sample) and the reason."""


# Most an image is enlarged to reach its target size (--max_upscale): more and the blur shows.
MAX_UPSCALE = 2.0


def load_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    size: tuple[int, int] | str | None = None,
    buckets: Sequence[tuple[int, int, int]] | None = None,
    max_upscale: float = MAX_UPSCALE,
) -> np.ndarray:
    """(1, H, W, 3) uint8: an image file (or its bytes, named `name` in errors) as a one-frame
    clip.

    The image is decoded whole by Pillow, turned upright by its EXIF orientation and converted
    to RGB (palette and greyscale expanded, 16-bit greyscale scaled to 8 bits, transparent
    pixels laid over white: their stored colour is arbitrary). (H, W) is `size`, or with
    size="native" the image's own height and width each cropped down to a multiple of
    NATIVE_MULTIPLE (`native_size`), or with `buckets` ((1, H, W) triples) the one whose aspect
    ratio is nearest the image's (`choose_bucket`; the first listed among equals); then
    `resize_crop`. Raises BadImage for data Pillow cannot decode, a truncated file (decoded with
    ImageFile.LOAD_TRUNCATED_IMAGES off, so that missing data is an error, not grey), and an
    image too small: one that would have to be enlarged more than `max_upscale` times in either
    side to cover (H, W), or, native, one under NATIVE_MULTIPLE pixels in either side.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if (size is None) == (buckets is None):
        raise ValueError("pass exactly one of size=(H, W) and buckets=[(1, H, W), ...]")
    if buckets is not None and (not buckets or any(b[0] != 1 for b in buckets)):
        raise ValueError(f"image buckets must be 1xHxW, got {list(buckets)}")
    if name is None:
        name = "<image bytes>" if isinstance(source, bytes) else str(source)
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(data) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):  # 16-bit greyscale: Pillow's RGB conversion clips it
                grey = np.asarray(img, np.float64) / 257.0
                img = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8))
            if img.has_transparency_data:
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            frame = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError as e:
        raise BadImage(name, "unreadable (not an image format Pillow reads)") from e
    except (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error) as e:
        # Pillow's decoders report damaged data in all of these; missing data in OSErrors
        # saying "image file is truncated" or "Truncated File Read".
        cut = isinstance(e, OSError) and "truncated" in str(e).lower()
        raise BadImage(
            name, f"truncated ({e})" if cut else f"unreadable ({type(e).__name__}: {e})"
        ) from e
    except Image.DecompressionBombError as e:
        raise BadImage(name, f"unreadable ({e})") from e
    h, w = frame.shape[:2]
    if size == NATIVE:
        height, width = native_size(h, w)
        if min(height, width) < NATIVE_MULTIPLE:
            raise BadImage(name, f"too small: {h}x{w} pixels, need {NATIVE_MULTIPLE} a side")
    else:
        height, width = choose_bucket(1, h, w, buckets)[1:] if buckets is not None else size
        scale = max(height / h, width / w)
        if scale > max_upscale:
            raise BadImage(
                name,
                f"too small: {h}x{w} pixels would be enlarged {scale:.2g}x to cover "
                f"{height}x{width} (at most {max_upscale:g}x)",
            )
    return resize_crop(frame[None], height, width)


def to_unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [-1, 1] (the VAE's input range)."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0
