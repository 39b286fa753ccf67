"""The deterministic synthetic datasets: the demo's shapes, and the detail set whose fine checks a 32-px pad view
averages away while AnyRes tiles keep them."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vitune import storage
from vitune.config import VisionConfig
from vitune.data import synthetic
from vitune.data.records import validate_record
from vitune.model.image import anyres_views, decode_image, fit_to_square
from vitune.vision_recipe import VisionRecipe, parse_grid_pinpoints

# LLaVA-1.6's grid at 32-px tiles, (h, w), as tests/unit/model/test_parity_anyres.py builds it
LLAVA_16_GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# sha256[:16] of the demo's records for seed 3, 12 + 4 images, as they were before the detail set was added
DEMO_RECORDS = {"captions": "2316a76b3c99f48a", "instruct": "759da5d918a3466b", "eval": "411cf018d1c9c71e"}


def test_synthetic_is_deterministic_and_valid(tmp_path):
    from vitune.data.records import validate_record

    a = synthetic.generate(str(tmp_path / "a"), seed=3, num_images=12, num_eval_images=4)
    b = synthetic.generate(str(tmp_path / "b"), seed=3, num_images=12, num_eval_images=4)
    c = synthetic.generate(str(tmp_path / "c"), seed=4, num_images=12, num_eval_images=4)
    for name in ("captions", "instruct", "eval"):
        assert storage.read_bytes(a["records"][name]) == storage.read_bytes(b["records"][name])
        for rec in storage.read_json(a["records"][name]):
            validate_record(rec)
    imgs_a = [storage.read_bytes(u) for u in storage.list_files(str(tmp_path / "a" / "images"))]
    imgs_b = [storage.read_bytes(u) for u in storage.list_files(str(tmp_path / "b" / "images"))]
    assert imgs_a == imgs_b and len(imgs_a) == 16
    assert storage.read_bytes(a["records"]["instruct"]) != storage.read_bytes(c["records"]["instruct"])
    evals = storage.read_json(a["records"]["eval"])
    assert {r["kind"] for r in evals} == set(synthetic.CHECKABLE_KINDS)
    assert all(r["conversations"][1]["value"] == r["answer"] for r in evals)


def test_the_demo_records_are_as_they_were(tmp_path):
    out = synthetic.generate(str(tmp_path), seed=3, num_images=12, num_eval_images=4)
    got = {name: hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16] for name, uri in out["records"].items()}
    assert got == DEMO_RECORDS


def test_the_detail_set_is_deterministic_valid_and_balanced(tmp_path):
    a = synthetic.detail_examples(seed=3, num_train=30, num_eval=12)
    assert a == synthetic.detail_examples(seed=3, num_train=30, num_eval=12)
    assert a != synthetic.detail_examples(seed=4, num_train=30, num_eval=12)
    for split, n in (("train", 30), ("eval", 12)):
        scenes = [scene for scene, _ in a[split]]
        assert Counter(s.pair for s in scenes) == {pair: n // 3 for pair in synthetic.DETAIL_PAIRS}
        assert {(s.width, s.height) for s in scenes} == set(synthetic.DETAIL_SIZES)
        assert all(0 <= s.x <= s.width - s.side and 0 <= s.y <= s.height - s.side for s in scenes)
        for scene, rec in a[split]:
            validate_record(rec)
            assert rec["answer"] == rec["conversations"][1]["value"] == scene.pair
    ids = [rec["id"] for split in a.values() for _, rec in split]
    assert len(set(ids)) == len(ids)  # held-out records are other records, not copies of training ones
    written = synthetic.generate_detail(str(tmp_path), seed=3, num_images=30, num_eval_images=12)
    for split in ("train", "eval"):
        records = storage.read_json(written["records"][split])
        assert records == [rec for _, rec in a[split]]
        scene, rec = a[split][0]
        image = decode_image(storage.read_bytes(storage.join(str(tmp_path), rec["image"])))
        assert np.array_equal(np.asarray(image), np.asarray(scene.render()))


def _chroma(pixels: np.ndarray) -> int:
    """The most colourful pixel's spread across channels (0 for greys, 255 for a primary)."""
    pixels = pixels.astype(int)
    return int((pixels.max(-1) - pixels.min(-1)).max())


@pytest.fixture(scope="module")
def anyres_recipe() -> VisionRecipe:
    pad = VisionRecipe.of(VisionConfig())
    return dataclasses.replace(pad, image_mode="anyres", grid_pinpoints=parse_grid_pinpoints(LLAVA_16_GRID_PX, 32))


def test_the_checks_survive_the_anyres_tiles_and_are_averaged_away_in_the_pad_view(anyres_recipe):
    """The views the towers get (`fit_to_square` for pad, `anyres_views` for anyres: what `preprocess` and
    `preprocess_tiles` normalise), with the tiny tower's mean as the pad colour. Each scene is drawn with each pair:
    the tiles hold the pair's two colours exactly, pixel for pixel; the pad views of the three pairs are the same
    grey square within a few levels, no pixel more colourful than the pad canvas itself."""
    from vitune.model.vision import load_vision_tower

    mean = load_vision_tower(VisionConfig()).mean
    canvas = _chroma(np.array([[fit_to_square(Image.new("RGB", (96, 32), (255, 255, 255)), 32, mean, "pad")
                                .getpixel((0, 0))]]))  # the pad fill's own colour
    worst_pad_gap = 0
    for scene, _ in synthetic.detail_examples(seed=0, num_train=24, num_eval=0)["train"]:
        pads, tiles = {}, {}
        for pair, colours in synthetic.DETAIL_PAIRS.items():
            image = dataclasses.replace(scene, pair=pair).render()
            views = anyres_views(image, anyres_recipe)
            assert len(views) == 4  # the base view and three 32-px tiles: the grid holds the image unresized
            tiles[pair] = np.concatenate([np.asarray(v) for v in views[1:]], axis=1)  # [32, 96, 3]
            # an oracle reading the tiles: their coloured pixels are the pair's two colours, half the square each
            found = Counter(tuple(p) for p in tiles[pair].reshape(-1, 3) if _chroma(p[None]) > 0)
            assert found == {c: scene.side * scene.side // 2 for c in colours}, (scene, found)
            pads[pair] = np.asarray(fit_to_square(image, 32, mean, "pad")).astype(int)  # [32, 32, 3]
            assert _chroma(pads[pair]) <= canvas + 4, (scene, pair, _chroma(pads[pair]))
        pairs = list(synthetic.DETAIL_PAIRS)
        for i, a in enumerate(pairs):
            for b in pairs[i + 1:]:
                assert np.abs(tiles[a].astype(int) - tiles[b]).max() == 255
                worst_pad_gap = max(worst_pad_gap, int(np.abs(pads[a] - pads[b]).max()))
    assert worst_pad_gap <= 10, worst_pad_gap  # of 255: bicubic's ringing at the square's edge, nothing more
