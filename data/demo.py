"""The built-in demo's data: procedurally drawn, captioned clips of a coloured shape moving over a
dark background ("a red circle moving left"), a word-level tokenizer for those captions and a
prompt-adherence scorer that reads the colour, the shape and the motion back from frames.

Clip i is drawn from (seed, i) alone, so the stream is reproducible. Frames are channels-last
(F, H, W, 3) float32 in [-1, 1].
"""

from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.9, 0.2),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)
BACKGROUND = (0.05, 0.05, 0.08)  # in [0, 1]
RADIUS = 0.28  # a shape's radius (a square's half side is 0.9 of it), as a fraction of the frame
TRAVEL = 0.25  # how far a shape moves over a clip, as a fraction of the frame
JITTER = 0.05  # how far a shape's mid-clip centre strays from the frame's centre (fraction)

VOCAB = ("<pad>", "<unk>", "a", "moving", *COLOURS, *SHAPES, *DIRECTIONS)
TEXT_LEN = 8  # tokens per caption, padded
NUM_CAPTIONS = len(COLOURS) * len(SHAPES) * len(DIRECTIONS)


def caption_parts(index: int) -> tuple[str, str, str]:
    """(colour, shape, direction) of clip `index`: every combination in turn."""
    colours, dirs = list(COLOURS), list(DIRECTIONS)
    c = index % len(colours)
    s = (index // len(colours)) % len(SHAPES)
    d = (index // (len(colours) * len(SHAPES))) % len(dirs)
    return colours[c], SHAPES[s], dirs[d]


def caption(index: int) -> str:
    colour, shape, direction = caption_parts(index)
    return f"a {colour} {shape} moving {direction}"


def render(
    colour: str,
    shape: str,
    direction: str,
    *,
    num_frames: int = 9,
    size: int = 32,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(F, size, size, 3) in [-1, 1]: the shape travels about half the frame along `direction`."""
    rng = rng or np.random.default_rng(0)
    radius = size * RADIUS + rng.uniform(-0.5, 0.5)
    travel = size * TRAVEL
    dx, dy = DIRECTIONS[direction]
    centre = size / 2 + rng.uniform(-size * JITTER, size * JITTER, 2)  # (x, y) at mid-clip
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    rgb = np.asarray(COLOURS[colour], np.float32)
    frames = np.empty((num_frames, size, size, 3), np.float32)
    frames[:] = np.asarray(BACKGROUND, np.float32)
    for f in range(num_frames):
        u = f / max(num_frames - 1, 1) - 0.5
        cx, cy = centre[0] + dx * travel * u, centre[1] + dy * travel * u
        if shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            inside = (np.abs(xx - cx) <= radius * 0.9) & (np.abs(yy - cy) <= radius * 0.9)
        frames[f][inside] = rgb
    return frames * 2.0 - 1.0


def make_clip(index: int, *, seed: int, num_frames: int = 9, size: int = 32):
    """(frames (F, H, W, 3) in [-1, 1], caption) of clip `index`."""
    colour, shape, direction = caption_parts(index)
    rng = np.random.default_rng((seed, index))
    frames = render(colour, shape, direction, num_frames=num_frames, size=size, rng=rng)
    return frames, f"a {colour} {shape} moving {direction}"


def tokenize(captions, length: int = TEXT_LEN) -> np.ndarray:
    """Word ids (B, length) int32, padded with 0 (unknown words: 1; longer captions cut)."""
    if isinstance(captions, str):
        captions = [captions]
    ids = np.zeros((len(captions), length), np.int32)
    lookup = {w: i for i, w in enumerate(VOCAB)}
    for row, text in enumerate(captions):
        words = [lookup.get(w, 1) for w in text.lower().split()][:length]
        ids[row, : len(words)] = words
    return ids


def transformers_tokenizer():
    """`tokenize` as a transformers tokenizer (a `PreTrainedTokenizerFast` over a word-level
    vocabulary: lower-cased words split at whitespace, unknown words <unk>, no end token,
    right-padded with <pad> and cut at the call's max_length), for a demo run exported as a
    diffusers model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", model_max_length=TEXT_LEN
    )


def read_clip(
    frames: np.ndarray, *, value_range=(-1.0, 1.0)
) -> tuple[str | None, str | None, str | None]:
    """(dominant colour, shape, motion direction) read from frames (F, H, W, 3); None where
    unclear.

    The foreground is the bright, saturated pixels. The colour is the palette entry nearest
    their mean over all frames. The shape is read from how much of the corners of its bounding
    box (outside the ellipse inscribed in it) the foreground fills, in the frames where it is
    whole (not touching the border): a square fills them, a disc leaves them empty; the median
    over those frames is taken against SQUARE_CORNERS. Unlike the share of the whole box, this
    does not mistake a square with bowed edges for a disc. The direction is the larger axis of
    the foreground centroid's displacement from the first frame to the last (at least 2
    pixels)."""
    lo, hi = value_range
    x = (np.asarray(frames, np.float32) - lo) / (hi - lo)  # [0, 1]
    strength = x.max(-1) - x.min(-1) * 0.5  # bright and saturated pixels stand out
    mask = strength > 0.45  # (F, H, W)
    if mask.sum() < 4:
        return None, None, None
    mean = x[mask].mean(0)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], np.float32)
    colour = names[int(np.argmin(((palette - mean) ** 2).sum(-1)))]
    return colour, _shape(mask), _direction(mask)


# The corners of a shape's bounding box (outside the ellipse inscribed in it) are all filled by a
# square and nearly empty for a disc: the shape is a square when more than this share is filled.
SQUARE_CORNERS = 0.5


def _shape(mask: np.ndarray) -> str | None:
    corners = []
    for m in mask:
        if m.sum() < 9 or m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
            continue  # too small to tell, or cut by the frame's border
        yy, xx = np.nonzero(m)
        y0, y1, x0, x1 = yy.min(), yy.max() + 1, xx.min(), xx.max() + 1
        gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
        ry, rx = (y1 - y0) / 2, (x1 - x0) / 2
        outside = ((gy - y0 - ry) / ry) ** 2 + ((gx - x0 - rx) / rx) ** 2 > 1.0
        if outside.any():
            corners.append((m[y0:y1, x0:x1] & outside).sum() / outside.sum())
    if not corners:
        return None
    return "square" if np.median(corners) > SQUARE_CORNERS else "circle"


def _direction(mask: np.ndarray) -> str | None:
    def centroid(m):
        if m.sum() < 2:
            return None
        yy, xx = np.nonzero(m)
        return np.array([xx.mean(), yy.mean()])

    first, last = centroid(mask[0]), centroid(mask[-1])
    if first is None or last is None:
        return None
    dx, dy = last - first
    if max(abs(dx), abs(dy)) < 2.0:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def prompt_adherence(frames: np.ndarray, caption: str, *, value_range=(-1.0, 1.0)) -> float:
    """1.0 when the colour, the shape and the direction read from `frames` all match `caption`,
    else 0."""
    words = caption.lower().split()
    return float(all(part in words for part in read_clip(frames, value_range=value_range)))
