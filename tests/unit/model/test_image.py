"""Image decoding and tower preprocessing against hand-computed pixels (vitune.model.image)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from vitune.model.image import (
    ImageError,
    check_dimensions,
    decode_image,
    fit_to_square,
    pad_fill,
    preprocess,
    to_rgb,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
FILL = (122, 116, 104)  # int(m * 255) of the CLIP mean
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rows(image: Image.Image) -> list[list[tuple[int, ...]]]:
    return [[image.getpixel((x, y)) for x in range(image.width)] for y in range(image.height)]


def test_pad_fill_is_truncated_mean() -> None:
    assert pad_fill(MEAN) == FILL


def test_pad_wide_image_fills_top_and_bottom_rows() -> None:
    square = fit_to_square(Image.new("RGB", (4, 2), RED), 4, MEAN, "pad")
    assert square.size == (4, 4)
    assert _rows(square) == [[FILL] * 4, [RED] * 4, [RED] * 4, [FILL] * 4]


def test_pad_tall_image_fills_left_and_right_columns() -> None:
    square = fit_to_square(Image.new("RGB", (2, 4), BLUE), 4, MEAN, "pad")
    assert _rows(square) == [[FILL, BLUE, BLUE, FILL]] * 4


def test_pad_odd_margin_puts_extra_row_at_the_bottom() -> None:
    # expand2square pastes at (side - h) // 2 = 1: one fill row above, two below
    square = fit_to_square(Image.new("RGB", (5, 2), GREEN), 5, MEAN, "pad")
    assert _rows(square) == [[FILL] * 5, [GREEN] * 5, [GREEN] * 5, [FILL] * 5, [FILL] * 5]


def test_pad_then_resize_is_bicubic_of_the_padded_canvas() -> None:
    image = Image.new("RGB", (16, 4), RED)
    image.paste(Image.new("RGB", (8, 4), BLUE), (8, 0))
    canvas = Image.new("RGB", (16, 16), FILL)
    canvas.paste(image, (0, 6))  # (16 - 4) // 2 rows above
    square = fit_to_square(image, 4, MEAN, "pad")
    assert square.size == (4, 4)
    assert _rows(square) == _rows(canvas.resize((4, 4), Image.Resampling.BICUBIC))
    assert _rows(square) != _rows(canvas.resize((4, 4), Image.Resampling.BILINEAR))


def test_preprocess_normalises_pad_and_image_pixels() -> None:
    pixels = preprocess(Image.new("RGB", (4, 2), RED), 4, MEAN, STD, "pad")
    assert pixels.shape == (3, 4, 4) and pixels.dtype == torch.float32
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    expected_fill = (torch.tensor(FILL) / 255.0 - mean) / std
    expected_red = (torch.tensor(RED, dtype=torch.float32) / 255.0 - mean) / std
    torch.testing.assert_close(pixels[:, 0, 0], expected_fill)
    torch.testing.assert_close(pixels[:, 3, 2], expected_fill)
    torch.testing.assert_close(pixels[:, 1, 0], expected_red)
    torch.testing.assert_close(pixels[:, 2, 3], expected_red)


def test_crop_takes_the_centre_of_a_wide_image() -> None:
    image = Image.new("RGB", (8, 4), RED)
    image.paste(Image.new("RGB", (4, 4), GREEN), (2, 0))
    image.paste(Image.new("RGB", (2, 4), BLUE), (6, 0))
    square = fit_to_square(image, 4, MEAN, "crop")
    assert _rows(square) == [[GREEN] * 4] * 4


def test_crop_resizes_shortest_side_then_crops_tall_image() -> None:
    # 8x32: shortest side 8 → 4, long side 32 → 16; centre crop keeps rows 6..9 of the resized image
    image = Image.new("RGB", (8, 32), RED)
    image.paste(Image.new("RGB", (8, 24), GREEN), (0, 4))
    square = fit_to_square(image, 4, MEAN, "crop")
    assert square.size == (4, 4)
    assert _rows(square) == [[GREEN] * 4] * 4


def test_pad_and_crop_differ_on_non_square() -> None:
    image = Image.new("RGB", (8, 4), RED)
    assert not torch.equal(preprocess(image, 4, MEAN, STD, "pad"), preprocess(image, 4, MEAN, STD, "crop"))


def test_unknown_mode_lists_valid_modes() -> None:
    with pytest.raises(ValueError, match="pad, crop"):
        fit_to_square(Image.new("RGB", (4, 4)), 4, MEAN, "stretch")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGBA", (3, 2), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent → white
        (Image.new("RGBA", (3, 2), (255, 0, 0, 255)), (255, 0, 0)),  # opaque keeps colour
        (Image.new("RGBA", (3, 2), (0, 0, 0, 128)), (127, 127, 127)),  # half black over white
        (Image.new("LA", (3, 2), (0, 0)), (255, 255, 255)),
        (Image.new("L", (3, 2), 77), (77, 77, 77)),
        (Image.new("CMYK", (3, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("I;16", (3, 2), 65535), (255, 255, 255)),
        (Image.new("1", (3, 2), 1), (255, 255, 255)),
    ],
    ids=["rgba-clear", "rgba-opaque", "rgba-half", "la", "l", "cmyk", "i16", "1bit"],
)
def test_to_rgb_modes(image: Image.Image, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert rgb.getpixel((1, 1)) == expected


def test_palette_with_transparency_composites_on_white() -> None:
    image = Image.new("P", (2, 2), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    rgb = decode_image(_encode(image))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (255, 0, 0)


def test_decode_rgba_png_and_pad_non_rgb_input() -> None:
    decoded = decode_image(_encode(Image.new("RGBA", (4, 2), (0, 0, 255, 255))))
    assert decoded.mode == "RGB" and decoded.size == (4, 2)
    square = fit_to_square(Image.new("LA", (4, 2), (0, 255)), 4, MEAN, "pad")  # non-RGB straight in
    assert _rows(square) == [[FILL] * 4, [(0, 0, 0)] * 4, [(0, 0, 0)] * 4, [FILL] * 4]


def test_decode_cmyk_jpeg_gives_rgb() -> None:
    decoded = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert decoded.mode == "RGB"
    assert all(c > 240 for c in decoded.getpixel((4, 4)))


def test_decode_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _encode(Image.new("RGB", (8, 4), RED), "JPEG", exif=exif)
    assert decode_image(data).size == (4, 8)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image format"),
        (b"P6\n100000 100000\n255\n", "too large"),
    ],
    ids=["empty", "junk", "bomb"],
)
def test_decode_rejects_bad_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_decode_rejects_truncated_png() -> None:
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageError, match="cannot decode image data"):
        decode_image(data[: len(data) // 2])


def test_decode_rejects_over_max_pixels_before_decoding() -> None:
    header_only = b"P6\n300 200\n255\n"  # no pixel data: refusing must not need it
    with pytest.raises(ImageError, match="60000 pixels"):
        decode_image(header_only, max_pixels=50_000)


def test_decode_rejects_extreme_aspect() -> None:
    with pytest.raises(ImageError, match="aspect ratio 200"):
        decode_image(_encode(Image.new("RGB", (400, 2))))


def test_image_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="zero-size"):
        check_dimensions(0, 10)
    with pytest.raises(ImageError, match="zero-size"):
        check_dimensions(10, 0)
    check_dimensions(10, 10)
