"""Deterministic synthetic LLaVA data: images of coloured shapes with checkable captions and questions.

Each image holds 1–3 copies of one shape in one colour. Stage-1 records caption it; stage-2 records ask
about colour, shape, count and position in several turns, plus a detailed description and a small
reasoning question. Held-out eval records carry the expected one-word answer, so training can be shown
to learn. Same seed → byte-identical images and records.

The detail set (``detail_examples`` / ``generate_detail``) is apart from the demo's data and leaves it as it was:
96x32 and 32x96 images with a small square of 1-px checks in a colour and its complement, and the question which
pair checks it. A 32-px pad view blends every pair to the same grey; AnyRes tiles hold the image at full
resolution (tests/unit/model/test_anyres_learning.py trains on it).
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vitune import storage

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ("left", "right", "top", "bottom")  # where a lone shape sits
CHECKABLE_KINDS = ("color", "shape", "count")

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "What does the image show?",
)
QUESTIONS = {
    "color": "What color are the shapes? Answer with one word.",
    "shape": "What kind of shape is shown? Answer with one word.",
    "count": "How many shapes are there? Answer with a number.",
    "position": "Where is the shape? Answer with one word.",
}
DETAIL_PROMPT = "Describe the image in detail."
REASONING_PROMPT = "If one more shape of the same kind were added, how many would there be?"


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    count: int
    position: str | None  # only for count == 1

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        text = f"{COUNT_WORDS[self.count]} {self.color} {noun}"
        if self.position:
            text += f" on the {self.position}"
        return text[0].upper() + text[1:] + "."

    def answer(self, kind: str) -> str:
        return {"color": self.color, "shape": self.shape, "count": str(self.count), "position": self.position}[kind]

    def detail(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        where = f", placed on the {self.position} side" if self.position else ", spread over the picture"
        return (
            f"The image shows {COUNT_WORDS[self.count]} {self.color} {noun} on a plain white background{where}. "
            f"There is nothing else in the picture."
        )


def _sample_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 3)
    return Scene(
        color=rng.choice(sorted(COLORS)),
        shape=rng.choice(SHAPES),
        count=count,
        position=rng.choice(POSITIONS) if count == 1 else None,
    )


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    fill = COLORS[scene.color]
    s = size // 4  # shape side
    if scene.position:
        cx, cy = {
            "left": (size // 4, size // 2),
            "right": (3 * size // 4, size // 2),
            "top": (size // 2, size // 4),
            "bottom": (size // 2, 3 * size // 4),
        }[scene.position]
        centers = [(cx, cy)]
    else:
        slots = [(size // 4, size // 4), (3 * size // 4, size // 4), (size // 4, 3 * size // 4),
                 (3 * size // 4, 3 * size // 4)]
        centers = rng.sample(slots, scene.count)
    for cx, cy in centers:
        jitter = size // 16
        cx += rng.randint(-jitter, jitter)
        cy += rng.randint(-jitter, jitter)
        _draw_shape(draw, scene.shape, (cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2), fill)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _instruct_conversation(scene: Scene, rng: random.Random) -> list[dict]:
    kinds = ["color", "shape", "count"] + (["position"] if scene.position else [])
    rng.shuffle(kinds)
    turns: list[dict] = []
    for i, kind in enumerate(kinds):
        q = QUESTIONS[kind]
        turns.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
        turns.append({"from": "gpt", "value": scene.answer(kind)})
    turns.append({"from": "human", "value": DETAIL_PROMPT})
    turns.append({"from": "gpt", "value": scene.detail()})
    turns.append({"from": "human", "value": REASONING_PROMPT})
    turns.append({"from": "gpt", "value": str(scene.count + 1)})
    return turns


def generate(
    output_uri: str,
    seed: int = 0,
    num_images: int = 64,
    num_eval_images: int = 16,
    image_size: int = 64,
) -> dict:
    """Write images and LLaVA JSON records under ``output_uri``; returns a summary with their URIs.

    Layout: ``images/train/NNNNN.png``, ``images/eval/NNNNN.png``, ``captions.json`` (stage 1),
    ``instruct.json`` (stage 2), ``eval.json`` (one checkable question per record, answer in ``answer``).
    """
    rng = random.Random(seed)
    captions, instruct, evals = [], [], []
    for split, n in (("train", num_images), ("eval", num_eval_images)):
        for i in range(n):
            scene = _sample_scene(rng)
            rel = f"images/{split}/{i:05d}.png"
            storage.write_bytes(storage.join(output_uri, rel), _png(render_scene(scene, image_size, rng)))
            if split == "train":
                captions.append({
                    "id": f"cap-{i:05d}",
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                        {"from": "gpt", "value": scene.caption()},
                    ],
                })
                instruct.append({"id": f"inst-{i:05d}", "image": rel,
                                 "conversations": _instruct_conversation(scene, rng)})
            else:
                for kind in CHECKABLE_KINDS:
                    evals.append({
                        "id": f"eval-{i:05d}-{kind}",
                        "image": rel,
                        "conversations": [
                            {"from": "human", "value": "<image>\n" + QUESTIONS[kind]},
                            {"from": "gpt", "value": scene.answer(kind)},
                        ],
                        "kind": kind,
                        "answer": scene.answer(kind),
                    })
    out = {}
    for name, records in (("captions", captions), ("instruct", instruct), ("eval", evals)):
        uri = storage.join(output_uri, f"{name}.json")
        storage.write_text(uri, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        out[name] = uri
    log.info("synthetic data: %d train + %d eval images under %s", num_images, num_eval_images, output_uri)
    return {"root": output_uri, "image_root": output_uri, "records": out,
            "num_images": num_images, "num_eval_images": num_eval_images}


def chance_accuracy() -> dict[str, float]:
    """Exact-match accuracy of uniform guessing per checkable kind (the bar training must clear)."""
    return {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "count": 1 / len(COUNT_WORDS)}


def corpus_texts() -> list[str]:
    """Texts the synthetic data can produce, for training the tiny offline tokenizer."""
    rng = random.Random(1234)
    texts = list(CAPTION_PROMPTS) + list(QUESTIONS.values()) + [DETAIL_PROMPT, REASONING_PROMPT]
    for _ in range(200):
        scene = _sample_scene(rng)
        texts += [scene.caption(), scene.detail()] + [scene.answer(k) for k in CHECKABLE_KINDS]
    return texts


# --- the "detail" set: fine checks that a 32-px pad view averages away and AnyRes tiles resolve ----------------
# Wide and tall images the LLaVA-1.6 grid at 32-px tiles ([[32, 96], [96, 32], ...] as (h, w)) tiles at full
# resolution, with no resize: a 96x32 image becomes a base view and three 32-px tiles. The pad path puts the same
# image on a 96x96 square and shrinks it to 32 px, so each pixel it sees blends about 3x3 of the original (more
# under bicubic's support). The detail is a small square of 1-px checks in a colour and its complement: every
# pair blends to the same mid grey, so at pad resolution the square is there but which pair checks it is not.
DETAIL_SIZES: tuple[tuple[int, int], ...] = ((96, 32), (32, 96))  # (width, height)
DETAIL_PAIRS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red and cyan": ((255, 0, 0), (0, 255, 255)),
    "green and magenta": ((0, 255, 0), (255, 0, 255)),
    "blue and yellow": ((0, 0, 255), (255, 255, 0)),
}
DETAIL_QUESTION = "Which two colors make the fine checks of the small square?"
DETAIL_SIDE = 16  # the checked square's side in pixels


@dataclass(frozen=True)
class DetailScene:
    """One detail image: a ``side``-px square of 1-px checks of ``pair`` at ``(x, y)`` (its top-left), on white.

    ``solid``: the square is filled with the pair's first colour instead, a control that survives the pad view.
    """

    pair: str
    width: int
    height: int
    x: int
    y: int
    side: int = DETAIL_SIDE
    solid: bool = False

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), (255, 255, 255))
        even, odd = DETAIL_PAIRS[self.pair]
        odd = even if self.solid else odd
        pixels = img.load()
        for dy in range(self.side):
            for dx in range(self.side):
                pixels[self.x + dx, self.y + dy] = even if (dx + dy) % 2 == 0 else odd
        return img


def sample_detail_scene(rng: random.Random, pair: str, side: int = DETAIL_SIDE, solid: bool = False) -> DetailScene:
    """A detail scene of ``pair``: one of ``DETAIL_SIZES``, the square anywhere inside it."""
    width, height = rng.choice(DETAIL_SIZES)
    return DetailScene(pair=pair, width=width, height=height, x=rng.randint(0, width - side),
                       y=rng.randint(0, height - side), side=side, solid=solid)


def detail_record(scene: DetailScene, rel: str, record_id: str) -> dict:
    """The LLaVA record of one detail image: the question and the pair's name (also in ``answer``)."""
    return {"id": record_id, "image": rel, "kind": "detail", "answer": scene.pair,
            "conversations": [{"from": "human", "value": "<image>\n" + DETAIL_QUESTION},
                              {"from": "gpt", "value": scene.pair}]}


def detail_examples(seed: int = 0, num_train: int = 384, num_eval: int = 60, side: int = DETAIL_SIDE,
                    solid: bool = False) -> dict[str, list[tuple[DetailScene, dict]]]:
    """Train and held-out detail scenes with their records, from one seed (same seed → same scenes).

    Each split is ``[(scene, record)]``; ``scene.render()`` draws the image the record's ``image`` names. The
    pairs are balanced within each split (a cycle over ``DETAIL_PAIRS``, shuffled), so a constant answer scores
    chance on the held-out split, give or take one record. ``solid``: the control set (see ``DetailScene``), the
    same scenes with plain squares.
    """
    rng = random.Random(seed)
    names = sorted(DETAIL_PAIRS)
    out: dict[str, list[tuple[DetailScene, dict]]] = {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        pairs = [names[i % len(names)] for i in range(n)]
        rng.shuffle(pairs)
        out[split] = [(scene, detail_record(scene, f"images/detail-{split}/{i:05d}.png", f"detail-{split}-{i:05d}"))
                      for i, scene in enumerate(sample_detail_scene(rng, pair, side, solid) for pair in pairs)]
    return out


def generate_detail(output_uri: str, seed: int = 0, num_images: int = 384, num_eval_images: int = 60) -> dict:
    """Write the detail set under ``output_uri``: ``images/detail-{train,eval}/NNNNN.png``, ``detail_train.json``
    and ``detail_eval.json`` (each record's expected answer in ``answer``); returns their URIs."""
    records = {}
    for split, examples in detail_examples(seed, num_images, num_eval_images).items():
        for scene, rec in examples:
            storage.write_bytes(storage.join(output_uri, rec["image"]), _png(scene.render()))
        uri = storage.join(output_uri, f"detail_{split}.json")
        storage.write_text(uri, json.dumps([rec for _, rec in examples], indent=1, ensure_ascii=False) + "\n")
        records[split] = uri
    return {"root": output_uri, "image_root": output_uri, "records": records,
            "num_images": num_images, "num_eval_images": num_eval_images}


def detail_chance_accuracy() -> float:
    """Exact-match accuracy of guessing one pair on the (pair-balanced) held-out detail questions."""
    return 1 / len(DETAIL_PAIRS)
