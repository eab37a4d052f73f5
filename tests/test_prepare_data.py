"""Dataset listings, clip and image decoding and `python -m tools.prepare_data`, on real mp4,
JPEG, PNG and WebP files and WebDataset tar shards."""

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import compile_env

from data import prepared, sources, video

ROOT = Path(__file__).resolve().parents[1]
H, W = 32, 48  # the target size of the CLI runs


def _frames(n, h, w, seed=0):
    """Smooth frames (a colour ramp that changes with time): a lossy codec keeps them close."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, 3)
    y = np.linspace(0, 40, h)[:, None, None]
    x = np.linspace(0, 40, w)[None, :, None]
    return np.stack([np.clip(base + y + x + 6 * t, 0, 255) for t in range(n)]).astype(np.uint8)


def _counter(n, h=16, w=16):
    """Frame i is a flat grey of 8 * i: the frame index can be read back from the pixels."""
    return np.stack([np.full((h, w, 3), 8 * i, np.uint8) for i in range(n)])


def _index_of(frames):
    return np.round(frames.reshape(len(frames), -1).mean(1) / 8).astype(int)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A videos.txt/prompts.txt folder with three good clips and five bad entries."""
    root = tmp_path_factory.mktemp("ds")
    folder = root / "data"
    (folder / "clips").mkdir(parents=True)
    good = {"clips/a.mp4": (12, H, W), "clips/b.mp4": (10, 64, 48), "c.mp4": (7, H, W)}
    for i, (name, shape) in enumerate(good.items()):
        video.write_mp4(folder / name, _frames(*shape, seed=i), fps=8)
    video.write_mp4(folder / "short.mp4", _frames(3, H, W), fps=8)
    video.write_mp4(folder / "nocap.mp4", _frames(9, H, W), fps=8)
    video.write_mp4(root / "outside.mp4", _frames(9, H, W), fps=8)
    data = (folder / "clips/a.mp4").read_bytes()
    (folder / "corrupt.mp4").write_bytes(data[: len(data) // 2])
    rows = [
        ("clips/a.mp4", "a red fox"),
        ("nocap.mp4", ""),
        ("corrupt.mp4", "a broken file"),
        ("clips/b.mp4", "a tall view"),
        ("../outside.mp4", "escapes the folder"),
        ("short.mp4", "too short"),
        ("c.mp4", "a short clip"),
    ]
    (folder / "videos.txt").write_text("\n".join(r[0] for r in rows) + "\n")
    (folder / "prompts.txt").write_text("\n".join(r[1] for r in rows) + "\n")
    return folder


def _cli(*args, check=True, devices=8):
    env = compile_env(devices)
    cmd = [sys.executable, "-m", "tools.prepare_data", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


RAW = ("--fps", 8, "--frames", 9, "--size", f"{H}x{W}", "--shard_size", 2, "--eval_examples", 1)
BAD = {
    "nocap.mp4": "missing caption",
    "corrupt.mp4": "unreadable",
    "../outside.mp4": "outside the dataset folder",
    "short.mp4": "too short",
}


@pytest.fixture(scope="module")
def raw(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "out"
    proc = _cli(dataset, out, *RAW)
    return out, proc


def _all(src):
    return [src[i] for i in range(len(src))]


def test_listing_skips_bad_entries(dataset):
    entries, skipped = sources.list_dataset(dataset)
    assert [e.name for e in entries] == [
        "clips/a.mp4",
        "corrupt.mp4",
        "clips/b.mp4",
        "short.mp4",
        "c.mp4",
    ]
    assert {s.path: s.reason for s in skipped} == {
        "nocap.mp4": "missing caption",
        "../outside.mp4": f"outside the dataset folder {dataset.resolve()}",
    }


def test_listing_manifests_and_escapes(dataset, tmp_path):
    (dataset / "link.mp4").symlink_to(dataset.parent / "outside.mp4")
    try:
        manifest = dataset / "list.csv"
        manifest.write_text(
            "path,caption\nclips/a.mp4,a red fox\nlink.mp4,a link out\n"
            f"{dataset / 'c.mp4'},absolute inside\n/etc/hostname,absolute outside\n"
            "gone.mp4,no file\nc.mp4,\n"
        )
        entries, skipped = sources.list_dataset(manifest)
        assert [(e.name, e.caption) for e in entries] == [
            ("clips/a.mp4", "a red fox"),
            (str(dataset / "c.mp4"), "absolute inside"),
        ]
        reasons = {s.path: s.reason.split(" /")[0] for s in skipped}
        assert reasons == {
            "link.mp4": "outside the dataset folder",
            "/etc/hostname": "outside the dataset folder",
            "gone.mp4": "missing file",
            "c.mp4": "missing caption",
        }
        jsonl = dataset / "list.jsonl"
        jsonl.write_text(json.dumps({"path": "c.mp4", "caption": "x"}) + "\n")
        assert [e.name for e in sources.list_dataset(jsonl)[0]] == ["c.mp4"]
        with pytest.raises(FileNotFoundError, match="no videos.txt"):
            sources.list_dataset(tmp_path)
    finally:
        (dataset / "link.mp4").unlink()
        (dataset / "list.csv").unlink(missing_ok=True)
        (dataset / "list.jsonl").unlink(missing_ok=True)


def test_fewer_prompt_lines_is_a_missing_caption(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        video.write_mp4(tmp_path / name, _frames(5, 16, 16), fps=8)
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\n")
    (tmp_path / "prompts.txt").write_text("only one\n")
    entries, skipped = sources.list_dataset(tmp_path)
    assert [e.name for e in entries] == ["a.mp4"]
    assert skipped == [sources.Skipped("b.mp4", "missing caption")]


def test_sampling_at_a_lower_fps_takes_every_third_frame(tmp_path):
    video.write_mp4(tmp_path / "count.mp4", _counter(30), fps=30)
    clip = video.load_clip(tmp_path / "count.mp4", fps=10, max_frames=9, size=(16, 16))
    assert clip.shape == (9, 16, 16, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(_index_of(clip), np.arange(9) * 3)
    # 30 frames at 10 fps supply 10: the largest 4k+1 is 9, also with room for 17.
    again = video.load_clip(tmp_path / "count.mp4", fps=10, max_frames=17, size=(16, 16))
    np.testing.assert_array_equal(again, clip)
    # A source slower than the target gives consecutive frames; 8k+1 counts for 1.5.
    video.write_mp4(tmp_path / "slow.mp4", _counter(12), fps=8)
    slow = video.load_clip(
        tmp_path / "slow.mp4", fps=16, max_frames=49, frame_multiple=8, size=(16, 16)
    )
    np.testing.assert_array_equal(_index_of(slow), np.arange(9))


def test_resize_covers_then_centre_crops():
    frames = np.zeros((1, 20, 40, 3), np.uint8)
    frames[:, :, 10:30] = 255  # the centre half of the width is white
    out = video.resize_crop(frames, 10, 10)  # scale 0.5 -> 10x20, crop the middle 10 columns
    assert out.shape == (1, 10, 10, 3)
    assert out.min() == 255
    up = video.resize_crop(frames, 40, 40)  # scale 2 -> 40x80, crop columns 20..60 of white
    assert up.shape == (1, 40, 40, 3) and up[:, :, 2:-2].min() > 250


def test_buckets_by_aspect_then_frames(tmp_path):
    buckets = [(9, 16, 24), (5, 16, 24), (9, 24, 16), (17, 16, 16)]
    video.write_mp4(tmp_path / "wide.mp4", _frames(12, 32, 48), fps=8)
    video.write_mp4(tmp_path / "tall.mp4", _frames(6, 48, 32), fps=8)
    video.write_mp4(tmp_path / "square_short.mp4", _frames(7, 32, 32), fps=8)
    shape = lambda name: video.load_clip(tmp_path / name, fps=8, buckets=buckets).shape  # noqa
    assert shape("wide.mp4") == (9, 16, 24, 3)
    assert shape("tall.mp4") == (5, 16, 24, 3)  # too short for 9x24x16: the nearest that fits
    assert shape("square_short.mp4") == (5, 16, 24, 3)
    assert video.choose_bucket(17, 32, 32, buckets) == (17, 16, 16)
    assert video.choose_bucket(4, 32, 32, buckets) is None


def test_bad_clips_raise(tmp_path, dataset):
    with pytest.raises(video.BadClip, match="corrupt.mp4: unreadable"):
        video.load_clip(dataset / "corrupt.mp4", fps=8, max_frames=9, size=(H, W))
    with pytest.raises(video.BadClip, match="short.mp4: too short: 3 frames"):
        video.load_clip(dataset / "short.mp4", fps=8, max_frames=9, size=(H, W))
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(video.BadClip, match="noise.mp4: unreadable"):
        video.load_clip(tmp_path / "noise.mp4", fps=8, max_frames=9, size=(H, W))
    # Index at the front (faststart), data cut: the container still declares every frame.
    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        noise = np.random.default_rng(1).integers(0, 256, (40, 32, 48, 3), np.uint8)
        for f in noise:  # big frames: the cut falls between whole frames
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(video.BadClip, match="cut.mp4: truncated: decoded [0-9]+ of the 40 frames"):
        video.load_clip(path, fps=8, max_frames=9, size=(H, W))


def test_raw_dataset(raw, dataset):
    out, proc = raw
    ds = prepared.open_prepared(out)
    assert ds.kind == "clips" and ds.splits == ("train", "eval")
    assert ds.meta["counts"] == {"train": 2, "eval": 1}
    assert ds.meta["fps"] == 8 and ds.meta["size"] == [H, W] and ds.meta["frame_multiple"] == 4
    train, evals = _all(ds.source("train")), _all(ds.source("eval"))
    assert [r["path"] for r in evals] == ["clips/a.mp4"]
    assert [r["path"] for r in train] == ["clips/b.mp4", "c.mp4"]
    assert [r["caption"] for r in train] == ["a tall view", "a short clip"]
    np.testing.assert_array_equal(ds.shapes("train"), [[9, H, W], [5, H, W]])
    np.testing.assert_array_equal(ds.shapes("eval"), [[9, H, W]])
    for r, shape in zip(train, ds.shapes("train"), strict=True):
        assert r["frames"].shape == (*shape, 3) and r["frames"].dtype == np.uint8
    # a.mp4 is already 32x48: the frames are the first 9 written, up to the codec's loss.
    got = evals[0]["frames"].astype(float)
    assert np.abs(got - _frames(12, H, W, seed=0)[:9]).mean() < 2.0
    # b.mp4 (64x48) is scaled to 48 wide (64 high) and its middle 32 rows kept.
    want_b = video.resize_crop(_frames(10, 64, 48, seed=1)[:9], H, W).astype(float)
    assert np.abs(train[0]["frames"] - want_b).mean() < 2.0
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["path"] for s in skipped] == [
        "nocap.mp4",
        "../outside.mp4",
        "corrupt.mp4",
        "short.mp4",
    ]
    for s in skipped:
        assert BAD[s["path"]] in s["reason"]
        assert f"skipped {s['path']}: {s['reason']}" in proc.stdout
    assert ds.skipped() == skipped


def test_raw_dataset_is_a_tfds_dataset(raw):
    import tensorflow_datasets as tfds

    out = raw[0]
    assert sorted(p.name for p in out.glob("cogvideox_prepared-*")) == [
        "cogvideox_prepared-eval.array_record-00000-of-00001",
        "cogvideox_prepared-train.array_record-00000-of-00002",
        "cogvideox_prepared-train.array_record-00001-of-00002",
    ]
    builder = tfds.builder_from_directory(out)
    info = builder.info
    assert info.name == "cogvideox_prepared"
    assert {k: v.num_examples for k, v in info.splits.items()} == {"train": 2, "eval": 1}
    # train: a shard of b and the corrupt entry, a shard of c and the short one.
    assert info.splits["train"].shard_lengths == [1, 1]
    assert set(info.features.keys()) == {"frames", "caption", "path"}
    assert info.features["frames"].shape == (None, None, None, 3)
    assert info.features["frames"].np_dtype == np.uint8
    ours = prepared.open_prepared(out).source("train")
    theirs = builder.as_data_source()["train"]
    for i in range(2):
        assert theirs[i]["caption"] == ours[i]["caption"].encode()
        np.testing.assert_array_equal(theirs[i]["frames"], ours[i]["frames"])
    evals = builder.as_data_source(split="eval")
    assert len(evals) == 1 and evals[0]["path"] == b"clips/a.mp4"


def test_raw_source_feeds_grain(raw):
    import grain

    ds = grain.MapDataset.source(prepared.open_prepared(raw[0]).source()).map(
        lambda r: video.to_unit_range(r["frames"])
    )
    x = ds[1]
    assert x.shape == (5, H, W, 3) and -1 <= x.min() and x.max() <= 1
    # Grain's worker processes get the source pickled, after it has been read from.
    src = prepared.open_prepared(raw[0]).source()
    first = src[0]
    clone = pickle.loads(pickle.dumps(src))
    assert clone._sources is None and clone[0]["path"] == first["path"] == "clips/b.mp4"
    np.testing.assert_array_equal(clone[0]["frames"], first["frames"])


def test_on_bad_error_names_the_first_bad_entry(dataset, tmp_path):
    proc = _cli(dataset, tmp_path / "out", *RAW, "--on_bad", "error", check=False)
    assert proc.returncode == 2
    assert "nocap.mp4: missing caption (--on_bad error)" in proc.stderr
    # Clips too: the first bad one in listing order.
    proc = _cli(dataset / "bad.csv", tmp_path / "out2", "--on_bad", "error", check=False)
    assert proc.returncode == 2 and "bad.csv: no such" in proc.stderr
    (dataset / "bad.csv").write_text("path,caption\nclips/a.mp4,x\nshort.mp4,y\ncorrupt.mp4,z\n")
    try:
        proc = _cli(dataset / "bad.csv", tmp_path / "out3", *RAW, "--on_bad", "error", check=False)
    finally:
        (dataset / "bad.csv").unlink()
    assert proc.returncode == 2
    assert "short.mp4: too short: 3 frames at 8.0 fps, need 5 (--on_bad error)" in proc.stderr


def test_resume_gives_the_same_dataset(raw, dataset, tmp_path):
    out = tmp_path / "out"
    proc = _cli(dataset, out, *RAW, "--max_shards", 1, check=False)
    assert proc.returncode == 3, proc.stderr
    assert not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="preparation not finished"):
        prepared.open_prepared(out)
    _cli(dataset, out, *RAW, "--max_shards", 1, check=False)
    # train (4 entries) is written first, in 2 shards; then eval.
    assert len(list((out / "train").glob("shard-*.json"))) == 2 and not (out / "eval").exists()
    # What a killed run leaves: a half-written shard under its temporary name.
    (out / "eval").mkdir()
    (out / "eval" / "shard-00000.array_record.partial").write_bytes(b"half a shard")
    _cli(dataset, out, *RAW)
    a, b = prepared.open_prepared(raw[0]), prepared.open_prepared(out)
    for split in ("train", "eval"):
        np.testing.assert_array_equal(a.shapes(split), b.shapes(split))
        for ra, rb in zip(_all(a.source(split)), _all(b.source(split)), strict=True):
            assert ra.keys() == rb.keys()
            for k in ra:
                np.testing.assert_array_equal(ra[k], rb[k])
    assert a.skipped() == b.skipped()
    import tensorflow_datasets as tfds

    splits = tfds.builder_from_directory(out).info.splits
    assert {k: v.shard_lengths for k, v in splits.items()} == {"train": [1, 1], "eval": [1]}
    proc = _cli(dataset, out, *RAW[:-2], "--eval_examples", 0, check=False)
    assert proc.returncode == 2
    assert "prepared with other settings" in proc.stderr and "eval_examples: was 1" in proc.stderr


def test_buckets_from_the_command_line(dataset, tmp_path):
    _cli(dataset, tmp_path / "out", "--fps", 8, "--buckets", "9x32x48,5x48x32")
    ds = prepared.open_prepared(tmp_path / "out")
    assert [r["path"] for r in _all(ds.source())] == ["clips/a.mp4", "clips/b.mp4", "c.mp4"]
    # b (64x48) is nearest 48x32 in aspect; c (7 frames) only fits the 5-frame bucket.
    np.testing.assert_array_equal(ds.shapes(), [[9, 32, 48], [5, 48, 32], [5, 48, 32]])
    assert ds.meta["buckets"] == [[9, 32, 48], [5, 48, 32]] and ds.meta["size"] is None
    bad = _cli(dataset, tmp_path / "x", "--buckets", "8x32x48", check=False)
    assert bad.returncode == 2 and "k * 4 + 1" in bad.stderr


def test_csv_manifest_and_slices(dataset, tmp_path):
    manifest = tmp_path / "m.csv"
    for name in ("clips/a.mp4", "c.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes((dataset / name).read_bytes())
    manifest.write_text('path,caption\nclips/a.mp4,"a fox, red"\nc.mp4,short\n')
    _cli(manifest, tmp_path / "out", "--fps", 8, "--frames", 9, "--size", f"{H}x{W}")
    ds = prepared.open_prepared(tmp_path / "out")
    assert [r["caption"] for r in _all(ds.source())] == ["a fox, red", "short"]
    # Two slices, one process each, read back as one dataset.
    sliced = tmp_path / "sliced"
    common = (manifest, sliced, "--fps", 8, "--frames", 9, "--size", f"{H}x{W}", "--num_shards", 2)
    _cli(*common, "--shard_index", 0)
    with pytest.raises(FileNotFoundError, match="incomplete parts.*part-00001-of-00002"):
        prepared.open_prepared(sliced)
    _cli(*common, "--shard_index", 1)
    parts = prepared.open_prepared(sliced)
    assert [r["path"] for r in _all(parts.source())] == ["clips/a.mp4", "c.mp4"]
    np.testing.assert_array_equal(parts.shapes(), ds.shapes())
    # Each slice is a TFDS dataset; a third slice of two entries has none: one empty shard.
    import tensorflow_datasets as tfds

    _cli(manifest, tmp_path / "thirds", *common[2:-1], 3, "--shard_index", 2)
    for folder, want in [
        (sliced / "part-00000-of-00002", ["clips/a.mp4"]),
        (sliced / "part-00001-of-00002", ["c.mp4"]),
        (tmp_path / "thirds" / "part-00002-of-00003", []),
    ]:
        builder = tfds.builder_from_directory(folder)
        assert builder.info.splits["train"].num_examples == len(want)
        if want:  # TFDS has no data source for a split with no records
            src = builder.as_data_source()["train"]
            assert [src[i]["path"].decode() for i in range(len(src))] == want
        assert [r["path"] for r in _all(prepared.open_prepared(folder).source())] == want


def test_not_a_prepared_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a prepared dataset"):
        prepared.open_prepared(tmp_path)
    # A folder in the earlier format (.npz records, no TFDS metadata) is refused by name.
    (tmp_path / "meta.json").write_text(json.dumps({"format": "cogvideox-prepared/1"}))
    with pytest.raises(ValueError, match="meta.json: format 'cogvideox-prepared/1', this reader"):
        prepared.open_prepared(tmp_path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random model folder with a text length of 12 (reference.tiny_model_folder)."""
    import reference as ref

    folder = tmp_path_factory.mktemp("model") / "model"
    ref.tiny_model_folder(folder, text_len=12, scaling_factor=0.7)
    return folder


@pytest.mark.slow
def test_latents_equal_our_vae_and_t5(model, dataset, tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from cogvideox_jax import components, t5

    out = tmp_path / "out"
    size = ("--fps", 8, "--frames", 9, "--size", f"{H}x{W}")
    # Two devices, batches of 2: a and b (9 frames) fill one batch; c (5) is padded.
    proc = _cli(dataset, out, "--model", model, *size, "--batch", 2, devices=2)
    assert "wrote" in proc.stdout
    ds = prepared.open_prepared(out)
    assert ds.kind == "latents" and ds.meta["counts"] == {"train": 3}
    assert ds.meta["text_len"] == 12 and ds.meta["latent_channels"] == 16
    assert ds.meta["scaling_factor"] == 0.7
    np.testing.assert_array_equal(ds.shapes(), [[3, 4, 6], [3, 4, 6], [2, 4, 6]])
    import tensorflow_datasets as tfds

    info = tfds.builder_from_directory(out).info
    assert info.splits["train"].num_examples == 3
    feats = info.features
    assert set(feats.keys()) == set(prepared.FIELDS["latents"])
    assert feats["latent_mean"].shape == (None, None, None, 16)
    assert feats["latent_logvar"].np_dtype == np.float32 and feats["text"].shape == (12, 16)
    assert (
        feats["first_frame"].shape == (None, None, 3) and feats["first_frame"].np_dtype == np.uint8
    )
    vae_model, encoder = components.load_vae(model), components.load_text_encoder(model)
    tokenizer = t5.load_tokenizer(model / "tokenizer")
    encode = nnx.jit(lambda m, x: m.encode(x))  # one program per clip shape, not op by op
    for r, shape in zip(_all(ds.source()), ds.shapes(), strict=True):
        clip = video.load_clip(dataset / r["path"], fps=8, max_frames=9, size=(H, W))
        mean, logvar = encode(vae_model, jnp.asarray(video.to_unit_range(clip))[None])
        assert r["latent_mean"].shape == (*shape, 16) and r["latent_mean"].dtype == np.float32
        np.testing.assert_allclose(r["latent_mean"], mean[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["latent_logvar"], logvar[0], rtol=1e-5, atol=1e-5)
        text = nnx.jit(lambda m, ids: m(ids))(
            encoder, jnp.asarray(t5.tokenize(tokenizer, [r["caption"]], 12))
        )[0]
        assert r["text"].shape == (12, 16) and r["text"].dtype == np.float32
        np.testing.assert_allclose(r["text"], text, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(r["first_frame"], clip[0])


# Images: still pictures prepared as one-frame clips, from manifests mixing them with videos and
# from WebDataset tar shards.


def _encoded(array, fmt, **kwargs):
    """The bytes of `array` (H, W, C) uint8 saved by Pillow in `fmt`."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _rgba(h, w):
    """A colour ramp whose left half is transparent (stored as black)."""
    rgba = np.concatenate([_frames(1, h, w, seed=5)[0], np.full((h, w, 1), 255, np.uint8)], -1)
    rgba[:, : w // 2] = 0
    return rgba


IH, IW = 40, 56  # the test images: landscape, a little larger than the target H x W
IMAGES = {  # name: (bytes, caption); the bad ones last
    "photo.jpg": (lambda: _encoded(_frames(1, IH, IW, seed=3)[0], "JPEG", quality=95), "a photo"),
    "grey.png": (lambda: _encoded(_frames(1, IH, IW, seed=4)[0, :, :, 0], "PNG"), "a grey ramp"),
    "alpha.webp": (lambda: _encoded(_rgba(IH, IW), "WEBP", lossless=True), "half see-through"),
    "corrupt.jpg": (lambda: np.random.default_rng(0).bytes(3000), "random bytes"),
    "cut.jpg": (lambda: _half(IMAGES["photo.jpg"][0]()), "cut short"),
    "tiny.png": (lambda: _encoded(_frames(1, 8, 8)[0], "PNG"), "eight pixels"),
    "nocap.jpg": (lambda: IMAGES["photo.jpg"][0](), ""),
}
BAD_IMAGES = {
    "corrupt.jpg": "unreadable (not an image format Pillow reads)",
    "cut.jpg": "truncated (",
    "tiny.png": "too small: 8x8 pixels would be enlarged 6x to cover 32x48 (at most 2x)",
    "nocap.jpg": "missing caption",
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The IMAGES and a 12-frame mp4, with a CSV manifest of them all (and a text file)."""
    folder = tmp_path_factory.mktemp("media")
    for name, (data, _) in IMAGES.items():
        (folder / name).write_bytes(data())
    video.write_mp4(folder / "clip.mp4", _frames(12, H, W, seed=6), fps=8)
    (folder / "notes.txt").write_text("not a picture")
    rows = [(n, c) for n, (_, c) in IMAGES.items()]
    rows[1:1] = [("clip.mp4", "a clip"), ("notes.txt", "not media")]
    (folder / "mixed.csv").write_text("path,caption\n" + "".join(f"{n},{c}\n" for n, c in rows))
    return folder


def _add_member(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder of two WebDataset shards as img2dataset writes them: key.jpg/.png/.webp with a
    key.txt or key.json caption; the second shard holds the bad samples."""
    folder = tmp_path_factory.mktemp("wds") / "shards"
    folder.mkdir()
    data = {n: d() for n, (d, _) in IMAGES.items()}
    samples = [
        [
            ("000000.jpg", data["photo.jpg"]),
            ("000000.txt", b"a photo\n"),
            ("000001.png", data["grey.png"]),
            ("000001.json", json.dumps({"caption": "a grey ramp", "width": IW}).encode()),
            ("000002.webp", data["alpha.webp"]),
            ("000002.json", json.dumps({"text": "half see-through"}).encode()),
            ("000003.jpg", data["corrupt.jpg"]),
            ("000003.txt", b"random bytes"),
        ],
        [
            ("000004.jpg", data["cut.jpg"]),
            ("000004.txt", b"cut short"),
            ("000005.png", data["tiny.png"]),
            ("000005.txt", b"eight pixels"),
            ("000006.jpg", data["nocap.jpg"]),
            ("000006.json", json.dumps({"caption": " ", "status": "success"}).encode()),
            ("000007.txt", b"a caption without its image"),
        ],
    ]
    for i, members in enumerate(samples):
        with tarfile.open(folder / f"{i:05d}.tar", "w") as tar:
            for name, payload in members:
                _add_member(tar, name, payload)
    (folder / "00000_stats.json").write_text("{}")  # img2dataset's other files are not read
    return folder


IMAGE_ARGS = ("--fps", 8, "--frames", 9, "--size", f"{H}x{W}", "--shard_size", 2)


def _skipped(out):
    return {
        s["path"]: s["reason"]
        for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())
    }


def _check_good_images(records, names):
    """The three good images in `records`, named `names`: one frame of H x W, their captions,
    their pixels as `load_image` makes them from the files."""
    assert [r["path"] for r in records] == names
    assert [r["caption"] for r in records] == ["a photo", "a grey ramp", "half see-through"]
    for r, file in zip(records, ["photo.jpg", "grey.png", "alpha.webp"], strict=True):
        assert r["frames"].shape == (1, H, W, 3) and r["frames"].dtype == np.uint8
        data = IMAGES[file][0]()
        np.testing.assert_array_equal(r["frames"], video.load_image(data, size=(H, W)))
    photo, grey, alpha = (r["frames"][0].astype(int) for r in records)
    assert np.abs(photo - video.resize_crop(_frames(1, IH, IW, seed=3), H, W)[0]).mean() < 3
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert alpha[:, : W // 2 - 2].min() == 255 and alpha[:, W // 2 + 2 :].max() < 255


def test_mixed_manifest_of_images_and_a_video(media, tmp_path):
    entries, skipped = sources.list_dataset(media / "mixed.csv")
    assert [(e.name, e.modality) for e in entries] == [
        ("photo.jpg", "image"),
        ("clip.mp4", "video"),
        ("grey.png", "image"),
        ("alpha.webp", "image"),
        ("corrupt.jpg", "image"),
        ("cut.jpg", "image"),
        ("tiny.png", "image"),
    ]
    assert [s.path for s in skipped] == ["notes.txt", "nocap.jpg"]
    assert skipped[0].reason.startswith("unknown file type .txt: images are .jpg, ")
    out = tmp_path / "out"
    # Interrupted after the first shard (photo, clip), then run again: it resumes.
    proc = _cli(media / "mixed.csv", out, *IMAGE_ARGS, "--max_shards", 1, check=False)
    assert proc.returncode == 3, proc.stderr
    first = out / "train" / "shard-00000.json"
    stamp = (first.stat().st_mtime_ns, first.stat().st_ino)
    proc = _cli(media / "mixed.csv", out, *IMAGE_ARGS)
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # not written again
    assert "modalities {'image': 3, 'video': 1}, 5 skipped" in proc.stdout
    ds = prepared.open_prepared(out)
    assert ds.kind == "clips" and ds.meta["modalities"] == {"image": 3, "video": 1}
    assert ds.meta["max_upscale"] == 2.0
    np.testing.assert_array_equal(ds.shapes(), [[1, H, W], [9, H, W], [1, H, W], [1, H, W]])
    records = _all(ds.source())
    clip = records.pop(1)
    assert clip["path"] == "clip.mp4" and clip["caption"] == "a clip"
    np.testing.assert_array_equal(
        clip["frames"], video.load_clip(media / "clip.mp4", fps=8, max_frames=9, size=(H, W))
    )
    _check_good_images(records, ["photo.jpg", "grey.png", "alpha.webp"])
    skipped = _skipped(out)
    assert list(skipped) == ["notes.txt", "nocap.jpg", "corrupt.jpg", "cut.jpg", "tiny.png"]
    for name, reason in BAD_IMAGES.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
        assert f"skipped {name}: {skipped[name]}" in proc.stdout
    again = _cli(media / "mixed.csv", out, *IMAGE_ARGS)
    assert "already complete" in again.stdout


def test_webdataset_shards(shards, tmp_path):
    entries, skipped = sources.list_dataset(shards)
    assert [(e.name, e.member, e.caption) for e in entries] == [
        ("00000.tar:000000", "000000.jpg", "a photo"),
        ("00000.tar:000001", "000001.png", "a grey ramp"),
        ("00000.tar:000002", "000002.webp", "half see-through"),
        ("00000.tar:000003", "000003.jpg", "random bytes"),
        ("00001.tar:000004", "000004.jpg", "cut short"),
        ("00001.tar:000005", "000005.png", "eight pixels"),
    ]
    assert {e.modality for e in entries} == {"image"} and entries[0].path == shards / "00000.tar"
    assert skipped == [
        sources.Skipped("00001.tar:000006", "missing caption"),
        sources.Skipped("00001.tar:000007", "no image member (.jpg, .jpeg, .png, .webp, .bmp)"),
    ]
    # One shard alone is a dataset too.
    assert [e.name for e in sources.list_dataset(shards / "00001.tar")[0]] == [
        "00001.tar:000004",
        "00001.tar:000005",
    ]
    out = tmp_path / "out"
    proc = _cli(shards, out, *IMAGE_ARGS)
    ds = prepared.open_prepared(out)
    assert ds.meta["modalities"] == {"image": 3, "video": 0}
    assert "modalities {'image': 3, 'video': 0}, 5 skipped" in proc.stdout
    names = ["00000.tar:000000", "00000.tar:000001", "00000.tar:000002"]
    _check_good_images(_all(ds.source()), names)
    np.testing.assert_array_equal(ds.shapes(), [[1, H, W]] * 3)
    skipped = _skipped(out)
    assert list(skipped) == [
        "00001.tar:000006",
        "00001.tar:000007",
        "00000.tar:000003",
        "00001.tar:000004",
        "00001.tar:000005",
    ]
    for name, file in [
        ("00000.tar:000003", "corrupt.jpg"),
        ("00001.tar:000004", "cut.jpg"),
        ("00001.tar:000005", "tiny.png"),
    ]:
        assert skipped[name].startswith(BAD_IMAGES[file]), (name, skipped[name])
    assert "already complete" in _cli(shards, out, *IMAGE_ARGS).stdout
    # In two slices: open_prepared sums the parts' modality counts.
    for i in range(2):
        _cli(shards, tmp_path / "sliced", *IMAGE_ARGS, "--num_shards", 2, "--shard_index", i)
    parts = prepared.open_prepared(tmp_path / "sliced")
    assert parts.meta["parts"] == 2 and parts.meta["modalities"] == {"image": 3, "video": 0}
    assert sorted(r["path"] for r in _all(parts.source())) == names


def test_an_unreadable_shard_is_skipped_whole(shards, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "00000.tar").write_bytes((shards / "00000.tar").read_bytes())
    (folder / "00001.tar").write_bytes(b"not a tar" * 100)
    entries, skipped = sources.list_dataset(folder)
    assert len(entries) == 4
    assert [s.path for s in skipped] == ["00001.tar"]
    assert skipped[0].reason.startswith("unreadable tar shard (ReadError")


def test_image_folders_and_listing_errors(media, tmp_path):
    for name in ("photo.jpg", "grey.png"):
        (tmp_path / name).write_bytes((media / name).read_bytes())
    (tmp_path / "images.txt").write_text("photo.jpg\ngrey.png\n")
    (tmp_path / "prompts.txt").write_text("a photo\n")
    entries, skipped = sources.list_dataset(tmp_path)
    assert [(e.name, e.modality) for e in entries] == [("photo.jpg", "image")]
    assert skipped == [sources.Skipped("grey.png", "missing caption")]
    (tmp_path / "videos.txt").write_text("clip.mp4\n")
    with pytest.raises(ValueError, match="both videos.txt and images.txt"):
        sources.list_dataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos.txt or images.txt .* no .tar shards"):
        sources.list_dataset(tmp_path / "empty")


def test_load_image_sizes_buckets_and_conversions(media, tmp_path):
    from PIL import Image

    photo = media / "photo.jpg"
    # native: 40x56 cropped down to multiples of 16; 8x8 has no 16-pixel side.
    assert video.load_image(photo, size="native").shape == (1, 32, 48, 3)
    with pytest.raises(video.BadImage, match="tiny.png: too small: 8x8 pixels, need 16"):
        video.load_image(media / "tiny.png", size="native")
    # Buckets: the nearest aspect ratio; a portrait image takes the portrait one.
    buckets = [(1, 32, 48), (1, 48, 32)]
    assert video.load_image(photo, buckets=buckets).shape == (1, 32, 48, 3)
    Image.open(photo).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tall.png")
    assert video.load_image(tmp_path / "tall.png", buckets=buckets).shape == (1, 48, 32, 3)
    with pytest.raises(ValueError, match="image buckets must be 1xHxW"):
        video.load_image(photo, buckets=[(9, 32, 48)])
    # Enlarging 40x56 to cover 64x96 is 1.7x: allowed by default, not with --max_upscale 1.5.
    assert video.load_image(photo, size=(64, 96)).shape == (1, 64, 96, 3)
    with pytest.raises(video.BadImage, match="enlarged 1.7x to cover 64x96 \\(at most 1.5x\\)"):
        video.load_image(photo, size=(64, 96), max_upscale=1.5)
    # A PNG cut short, bytes named in errors; 16-bit greyscale scaled, not clipped.
    png = (media / "grey.png").read_bytes()
    with pytest.raises(video.BadImage, match="x.png: truncated \\(image file is truncated"):
        video.load_image(png[: len(png) // 2], name="x.png", size=(H, W))
    Image.fromarray(np.full((IH, IW), 60000, np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert (video.load_image(tmp_path / "deep.png", size=(H, W)) == 233).all()


def test_on_bad_error_stops_at_the_first_bad_image(media, tmp_path):
    manifest = media / "bad_images.csv"
    manifest.write_text("path,caption\nphoto.jpg,a\ncorrupt.jpg,b\ntiny.png,c\n")
    try:
        proc = _cli(manifest, tmp_path / "out", *IMAGE_ARGS, "--on_bad", "error", check=False)
    finally:
        manifest.unlink()
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: corrupt.jpg: unreadable (not an image format Pillow reads) (--on_bad error)"
    ]


def test_image_buckets_from_the_command_line(media, tmp_path):
    args = ("--fps", 8, "--buckets", "9x32x48,1x48x32,1x32x48")
    _cli(media / "mixed.csv", tmp_path / "out", *args)
    ds = prepared.open_prepared(tmp_path / "out")
    np.testing.assert_array_equal(ds.shapes(), [[1, 32, 48], [9, 32, 48], [1, 32, 48], [1, 32, 48]])
    # Images but no one-frame bucket (or videos but only one-frame ones): refused before work.
    proc = _cli(media / "mixed.csv", tmp_path / "x", "--buckets", "9x32x48", check=False)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert (
        "mixed.csv: 6 image entries, but --buckets has no one-frame bucket (1xHxW)" in proc.stderr
    )
    proc = _cli(media / "mixed.csv", tmp_path / "x", "--buckets", "1x32x48", check=False)
    assert (
        proc.returncode == 2
        and "1 video entries, but --buckets has no video bucket (4k+1 frames)" in proc.stderr
    )
