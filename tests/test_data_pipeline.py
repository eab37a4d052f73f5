"""data/loader.py and data/packing.py: bucketing and packed batches over a prepared dataset.

The source is a small in-memory stand-in with the record dicts of data/prepared.py ("latents"
records); the expected values are recomputed here from the records and the documented rules
(eps from default_rng((seed, position)), patchify order, front padding for patch_size_t=2).
"""

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import grain
import numpy as np
import pytest

from data import loader, packing

ROOT = Path(__file__).resolve().parents[1]
# CogVideoX-like latent shapes (T, h, w) at about 1/4 scale: 49 / 25 / 13 frames, landscape,
# portrait and square; 7 shapes. S text tokens = 16.
SHAPES = [
    (13, 16, 22),
    (13, 12, 20),
    (7, 16, 22),
    (13, 24, 14),
    (4, 16, 22),
    (13, 8, 12),
    (10, 12, 16),
]
S, DT, C = 16, 8, 4


class MemSource:
    """Random-access "latents" records, record i from default_rng((seed, i))."""

    def __init__(self, shapes, seed=0):
        self.shapes = np.asarray(shapes).reshape(-1, 3)
        self.seed = seed

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, i))
        shape = (*self.shapes[i], C)
        return {
            "latent_mean": rng.standard_normal(shape, dtype=np.float32),
            "latent_logvar": rng.uniform(-3, 0, shape).astype(np.float32),
            "text": rng.standard_normal((S, DT), dtype=np.float32),
            "first_frame": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "caption": f"caption {i}",
            "path": f"clip{i}.mp4",
        }


def mixed_source(per_shape=10):
    return MemSource([SHAPES[i % len(SHAPES)] for i in range(per_shape * len(SHAPES))])


def expected_sample(rec, seed, position):
    eps = np.random.default_rng((seed, position)).standard_normal(
        rec["latent_mean"].shape, dtype=np.float32
    )
    return rec["latent_mean"] + np.exp(0.5 * rec["latent_logvar"]) * eps


def test_patchify_matches_model():
    from cogvideox_jax import transformer

    x = np.random.default_rng(0).standard_normal((2, 4, 6, 8, 3), dtype=np.float32)
    for pt in (1, 2):
        ref = getattr(transformer, "patchify", None)
        if ref is not None:
            want = np.asarray(ref(x, 2, pt))
        else:  # the model's own method, until the module-level function is merged
            fake = types.SimpleNamespace(cfg=types.SimpleNamespace(patch_size=2, patch_size_t=pt))
            want = np.asarray(transformer.Transformer._patchify(fake, x))
        np.testing.assert_array_equal(packing.patchify(x, 2, pt), want)
        # The contract spelled out: token (t, h, w) holds x[t*pt:, h*p:, w*p:] flattened.
        tok = packing.patchify(x[1], 2, pt)[(1 * 3 + 2) * 4 + 3]  # (t, h, w) = (1, 2, 3)
        np.testing.assert_array_equal(tok, x[1, pt : 2 * pt, 4:6, 6:8].reshape(-1))


def test_default_budget_packing_efficiency():
    src = mixed_source()
    tokens = packing.video_tokens(src.shapes, 2, None)
    budget = packing.default_budget(tokens, text_len=S)
    ds = loader.train_dataset(
        src, src.shapes, batch_size=4, rows=None, seed=0, packing=True,
        video_budget=budget.video, max_clips=budget.clips,
    )  # fmt: skip
    it = iter(ds)
    effs = [packing.packing_efficiency(next(it)) for _ in range(20)]
    # Bucketing with padding to the largest clip instead: real tokens over the padded ones.
    padded = (tokens + S).sum() / (len(tokens) * (tokens.max() + S))
    print(f"budget {budget}; packed {np.mean(effs):.3f} (min {min(effs):.3f}); padded {padded:.3f}")
    assert np.mean(effs) >= 0.9, (budget, effs)
    assert budget.video % packing.VIDEO_ALIGN == 0 and budget.video >= tokens.max()


def check_packed_batch(batch, src, seed, position_of, pt):
    """Every row of a packed batch against the records; returns the record indices in it."""
    seen = []
    text_of = {i: src[i]["text"][0].tobytes() for i in range(len(src))}
    index_of_text = {v: k for k, v in text_of.items()}
    for r in range(batch["video"].shape[0]):
        vid_ids, txt_ids = batch["video_segment_ids"][r], batch["text_segment_ids"][r]
        n = vid_ids.max()
        assert set(np.unique(vid_ids)) - {0} == set(range(1, n + 1))
        assert set(np.unique(txt_ids)) - {0} == set(range(1, n + 1))
        assert not batch["grids"][r, n:].any()
        for k in range(1, n + 1):
            text = batch["text"][r][txt_ids == k]
            i = index_of_text[text[0].tobytes()]
            rec = src[i]
            np.testing.assert_array_equal(text, rec["text"])
            z = expected_sample(rec, seed, position_of(i))
            while z.shape[0] % pt:  # front padding with the first frame
                z = np.concatenate([z[:1], z])
            grid = (z.shape[0] // pt, z.shape[1] // 2, z.shape[2] // 2)
            np.testing.assert_array_equal(batch["grids"][r, k - 1], grid)
            np.testing.assert_allclose(
                batch["video"][r][vid_ids == k], packing.patchify(z, 2, pt), rtol=1e-6, atol=1e-6
            )
            pos = batch["video_positions"][r][vid_ids == k]
            np.testing.assert_array_equal(pos, np.argwhere(np.ones(grid, bool)))
            seen.append(i)
        for key, ids in (("video", vid_ids), ("video_positions", vid_ids), ("text", txt_ids)):
            assert not batch[key][r][ids == 0].any(), f"{key} not zero on padding"
    return seen


@pytest.mark.parametrize("patch_size_t", [None, 2])
def test_packed_rows_follow_contract_one_epoch(patch_size_t):
    src, seed = mixed_source(per_shape=3), 3
    order = np.asarray(list(grain.MapDataset.range(len(src)).shuffle(seed=seed)))
    position_of = {int(i): p for p, i in enumerate(order)}.__getitem__
    tokens = packing.video_tokens(src.shapes, 2, patch_size_t)
    seen = {}
    for rows in ([0, 1], [2, 3]):  # two processes' shares make the whole epoch
        ds = loader.train_dataset(
            src, src.shapes, batch_size=4, rows=np.array(rows), seed=seed, packing=True,
            patch_size_t=patch_size_t, video_budget=2 * int(tokens.max()), max_clips=4,
            repeat=False,
        )  # fmt: skip
        seen[rows[0]] = []
        for batch in ds:
            assert batch["video"].shape[0] == 2
            seen[rows[0]] += check_packed_batch(batch, src, seed, position_of, patch_size_t or 1)
    assert not set(seen[0]) & set(seen[2])
    assert sorted(seen[0] + seen[2]) == list(range(len(src)))  # each clip exactly once


def test_packed_position_moves_to_another_process_count():
    """Two processes pack a few batches; one process resumes from their (shared) position and
    finishes the epoch: every clip exactly once, and the batches the two would have loaded."""
    src, seed = mixed_source(per_shape=8), 4
    order = np.asarray(list(grain.MapDataset.range(len(src)).shuffle(seed=seed)))
    position_of = {int(i): p for p, i in enumerate(order)}.__getitem__
    kw = dict(
        batch_size=4, seed=seed, packing=True, video_budget=2304, max_clips=4, repeat=False
    )  # fmt: skip
    two = [
        iter(loader.train_dataset(src, src.shapes, rows=np.array(r), **kw))
        for r in ([0, 1], [2, 3])
    ]
    seen = []
    for _ in range(2):
        for it in two:
            seen += check_packed_batch(next(it), src, seed, position_of, 1)
    states = [json.loads(json.dumps(it.get_state())) for it in two]
    assert states[0] == states[1]  # one position for all processes
    rest_two = [
        {k: np.concatenate([a[k], b[k]]) for k in a}
        for a, b in zip(*(list(it) for it in two), strict=True)
    ]
    one = iter(loader.train_dataset(src, src.shapes, rows=None, **kw))
    one.set_state(states[0])
    rest_one = list(one)
    assert len(rest_one) == len(rest_two) >= 2
    for got, want in zip(rest_one, rest_two, strict=True):
        assert got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])
        seen += check_packed_batch(got, src, seed, position_of, 1)
    assert sorted(seen) == list(range(len(src)))  # no clip skipped, none seen twice


def test_bad_clips_are_errors_naming_them():
    src = MemSource([(4, 8, 8), (13, 16, 22), (4, 8, 8)])
    with pytest.raises(ValueError, match=r"clip1\.mp4.*1144 video tokens"):
        loader.train_dataset(
            src, src.shapes, batch_size=1, rows=None, seed=0, packing=True,
            video_budget=1000, max_clips=2,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"clip1\.mp4"):
        packing.clip_tokens(
            np.zeros((13, 16, 22, 4)), np.zeros((S, DT)), patch_size=2, patch_size_t=None,
            video_budget=1000, text_len=S, path="clip1.mp4",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"clip2\.mp4.*16 text rows"):
        packing.clip_tokens(
            np.zeros((4, 8, 8, 4)), np.zeros((S + 1, DT)), patch_size=2, patch_size_t=None,
            video_budget=1000, text_len=S, path="clip2.mp4",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"clip3\.mp4.*divisible by patch_size 2"):
        packing.clip_tokens(
            np.zeros((4, 8, 7, 4)), np.zeros((S, DT)), patch_size=2, patch_size_t=None,
            video_budget=1000, text_len=S, path="clip3.mp4",
        )  # fmt: skip


def test_bucketing_one_shape_per_batch_and_process_rows():
    src = mixed_source(per_shape=5)  # 35 clips, 5 per shape
    kw = dict(batch_size=4, seed=1, packing=False, image=True)
    whole = iter(loader.train_dataset(src, src.shapes, rows=None, **kw))
    halves = [
        iter(loader.train_dataset(src, src.shapes, rows=np.array(r), **kw))
        for r in ([0, 1], [2, 3])
    ]
    for _ in range(10):  # more than one epoch (7 batches each)
        b, h0, h1 = next(whole), next(halves[0]), next(halves[1])
        assert set(b) == {"latents", "text", "image"}
        assert b["latents"].shape[0] == 4 and h0["latents"].shape[0] == 2
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        for k in b:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), b[k])
    assert loader.dropped_per_epoch(src.shapes, 4) == 7  # one of 5 per shape
    one_pass = loader.train_dataset(src, src.shapes, rows=None, repeat=False, **kw)
    assert sum(x["latents"].shape[0] for x in one_pass) == len(src) - 7
    plan = loader.bucket_plan(src.shapes, 4, seed=1, epoch=0, shuffle=True)
    assert all(len({tuple(src.shapes[i]) for i in batch}) == 1 for batch in plan)


def test_latent_sample_per_use():
    src, seed = MemSource([(4, 8, 8)] * 3), 5
    it = iter(
        loader.train_dataset(
            src, src.shapes, batch_size=3, rows=None, seed=seed, packing=False, shuffle=False
        )
    )
    epochs = [next(it)["latents"] for _ in range(2)]  # the same three clips twice
    for e, lat in enumerate(epochs):
        for r in range(3):
            np.testing.assert_allclose(
                lat[r], expected_sample(src[r], seed, 3 * e + r), rtol=1e-6, atol=1e-6
            )
    assert np.abs(epochs[0] - epochs[1]).min() > 0


RESUME_SCRIPT = """
import json, sys
import numpy as np
from data import loader, packing
from test_data_pipeline import mixed_source, resume_batches

packing_mode, workers = json.loads(sys.argv[1])
print(json.dumps(resume_batches(packing_mode, workers)))
"""


def resume_batches(packing_mode, workers, k=3, n=5):
    """Digests of batches k..k+n of a pipeline and of a fresh one restored at batch k."""
    src = mixed_source(per_shape=4)
    kw = dict(
        batch_size=4, rows=np.array([2, 3]), seed=7, packing=packing_mode, workers=workers,
        video_budget=2304, max_clips=5, image=not packing_mode,
    )  # fmt: skip

    def digest(batch):
        return {key: hashlib.sha256(v.tobytes()).hexdigest() for key, v in batch.items()}

    it = iter(loader.train_dataset(src, src.shapes, **kw))
    for _ in range(k):
        next(it)
    state = it.get_state()
    want = [digest(next(it)) for _ in range(n)]
    close(it)
    it = iter(loader.train_dataset(src, src.shapes, **kw))
    it.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
    got = [digest(next(it)) for _ in range(n)]
    close(it)
    return {"want": want, "got": got}


def close(it):
    if hasattr(it, "close"):
        it.close()


@pytest.mark.parametrize("packing_mode", [True, False])
def test_resume_is_bit_equal(packing_mode):
    out = resume_batches(packing_mode, workers=0)
    assert out["want"] == out["got"]
    assert out["want"][0] != out["want"][1]


@pytest.mark.slow
@pytest.mark.parametrize("packing_mode", [True, False])
def test_resume_is_bit_equal_with_worker_processes(packing_mode):
    # mp_prefetch workers import the source's module: run in a fresh interpreter.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, json.dumps([packing_mode, 2])],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["want"] == out["got"]
    assert out == resume_batches(packing_mode, workers=0)  # workers change nothing


class ClipSource:
    """Random-access "clips" records: (F, H, W, 3) uint8 frames."""

    def __init__(self, shapes):
        self.shapes = np.asarray(shapes).reshape(-1, 3)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        frames = np.random.default_rng(i).integers(0, 256, (*self.shapes[i], 3), dtype=np.uint8)
        return {"frames": frames, "caption": f"caption {i}", "path": f"clip{i}.mp4"}


def latent_shape(f, h, w):
    return (f - 1) // 4 + 1, h // 8, w // 8


def encode(rec):
    """A stand-in for the VAE and text encoder; records its process id."""
    ENCODE_PIDS.add(os.getpid())
    x = rec["frames"][::4, ::8, ::8].astype(np.float32) / 255  # (T, h, w, 3)
    i = int(rec["path"][4:-4])
    return {
        "latent_mean": x,
        "latent_logvar": np.full_like(x, -2.0),
        "text": np.random.default_rng((99, i)).standard_normal((S, DT), dtype=np.float32),
        "first_frame": rec["frames"][0],
    }


ENCODE_PIDS = set()


class Encoded:
    """The clips source as the "latents" records `encode` makes of it."""

    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return encode(self.src[i])


def clips_batches(workers):
    """One unshuffled pass over a clips source (so position = record index)."""
    src = ClipSource([(17, 32, 48), (9, 48, 32), (17, 64, 64), (5, 32, 32)] * 3)
    ds = loader.train_dataset(
        src, src.shapes, batch_size=2, rows=None, seed=2, packing=True, video_budget=256,
        max_clips=4, text_len=S, workers=workers, encode=encode, latent_shape=latent_shape,
        shuffle=False, repeat=False,
    )  # fmt: skip
    it = iter(ds)
    out = list(it)
    close(it)
    return out, src


def test_clips_records_are_encoded():
    batches, src = clips_batches(workers=0)
    seen = []
    for batch in batches:
        seen += check_packed_batch(batch, Encoded(src), 2, lambda i: i, pt=1)
    assert sorted(seen) == list(range(len(src)))
    # Bucketing: same-shape batches of the encoded latents; the bucket plan on pixel shapes.
    ds = loader.train_dataset(
        src, src.shapes, batch_size=3, rows=None, seed=2, packing=False, image=True,
        encode=encode, latent_shape=latent_shape, shuffle=False, repeat=False,
    )  # fmt: skip
    plan = loader.bucket_plan(src.shapes, 3, seed=2, epoch=0, shuffle=False)
    batches = list(ds)
    assert len(batches) == len(plan) == 4
    for k, (batch, idx) in enumerate(zip(batches, plan, strict=True)):
        recs = [Encoded(src)[i] for i in idx]
        want = [expected_sample(r, 2, 3 * k + j) for j, r in enumerate(recs)]
        np.testing.assert_allclose(batch["latents"], np.stack(want), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(batch["text"], np.stack([r["text"] for r in recs]))
        want_image = np.stack([r["first_frame"] for r in recs]) / 127.5 - 1
        np.testing.assert_allclose(batch["image"], want_image, rtol=1e-6, atol=1e-6)


CLIPS_SCRIPT = """
import hashlib, json, os
from test_data_pipeline import ENCODE_PIDS, clips_batches

batches, _ = clips_batches(workers=2)
print(json.dumps({"pids": sorted(ENCODE_PIDS), "me": os.getpid(), "digest": [
    {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in b.items()} for b in batches]}))
"""


@pytest.mark.slow
def test_clips_encode_stays_in_main_process_with_workers():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run(
        [sys.executable, "-c", CLIPS_SCRIPT], env=env, capture_output=True, text=True,
        timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pids"] == [out["me"]]
    want, _ = clips_batches(workers=0)
    assert out["digest"] == [
        {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in b.items()} for b in want
    ]


# ---- Mixtures of datasets (images beside clips) ----

IMAGE_SHAPES = [(1, 16, 22), (1, 12, 20), (1, 24, 14)]  # one latent frame: images


def two_datasets():
    """Clips (28 records) then images (30 records), one source, with the mixture's counts."""
    clips = [SHAPES[i % len(SHAPES)] for i in range(28)]
    images = [IMAGE_SHAPES[i % 3] for i in range(30)]
    return MemSource(clips + images), [28, 30]


@pytest.mark.parametrize("packing_mode", [True, False])
def test_mixture_honours_weights_and_resumes(packing_mode):
    """Two datasets mixed 0.7 / 0.3: over 500 draws (clips when packing, batches when bucketing)
    each dataset's share is within 2% of its weight; images and clips share packed rows;
    bucketed batches are one shape each; a restored iterator continues the same stream; and
    process rows are blocks of the same global batches."""
    src, counts = two_datasets()
    mixture = [(counts[0], 0.7), (counts[1], 0.3)]
    kw = dict(batch_size=4, seed=3, packing=packing_mode, video_budget=2304, max_clips=6)
    kw["mixture"] = mixture
    if packing_mode:  # the plan alone: which records the stream draws
        plan = iter(loader.pack_plan(
            packing.video_tokens(src.shapes, 2, None), 4, np.arange(4), video_budget=2304,
            max_clips=6, text_len=S, num_bins=16, seed=3, shuffle=True, repeat=True,
            mixture=mixture,
        ))  # fmt: skip
        drawn = []
        while len(drawn) < 500:
            drawn += [i for row in next(plan) for _, i in row]
        share = np.mean(np.asarray(drawn[:500]) >= counts[0])
        rows = [row for _ in range(5) for row in next(plan)]
        assert any(
            len({src.shapes[i][0] == 1 for _, i in row}) == 2 for row in rows
        )  # a row with an image and a clip
    else:
        it = iter(loader.train_dataset(src, src.shapes, rows=None, **kw))
        frames = [next(it)["latents"].shape[1] for _ in range(500)]
        share = np.mean(np.asarray(frames) == 1)  # image batches
    assert abs(share - 0.3) <= 0.02, share
    whole = iter(loader.train_dataset(src, src.shapes, rows=None, **kw))
    for _ in range(3):
        next(whole)
    state = json.loads(json.dumps(whole.get_state()))
    want = [next(whole) for _ in range(4)]
    again = iter(loader.train_dataset(src, src.shapes, rows=np.array([2, 3]), **kw))
    again.set_state(state)
    for batch in want:
        got = next(again)
        key = "video" if packing_mode else "latents"
        np.testing.assert_array_equal(got[key], batch[key][2:])
    with pytest.raises(ValueError, match="must add up to 58"):
        loader.train_dataset(src, src.shapes, rows=None, **(kw | {"mixture": [(28, 1.0)]}))


@pytest.mark.parametrize("packing_mode", [True, False])
def test_one_dataset_mixture_is_the_plain_stream(packing_mode):
    src = mixed_source(per_shape=4)
    kw = dict(batch_size=4, rows=None, seed=2, packing=packing_mode, video_budget=2304)
    kw["max_clips"] = 5
    plain = iter(loader.train_dataset(src, src.shapes, **kw))
    mixed = iter(loader.train_dataset(src, src.shapes, mixture=[(len(src), 2.0)], **kw))
    for _ in range(9):  # past an epoch
        a, b = next(plain), next(mixed)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
