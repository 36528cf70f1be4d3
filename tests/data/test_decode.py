"""Image decoding: torchvision.io for JPEG/PNG gives PIL's RGB for every colour mode, deeper images are scaled
(not clipped), EXIF orientation turns pixels as PIL does, and a note is said once across worker processes."""

from __future__ import annotations

import multiprocessing
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from frcnn_train.data import decode
from frcnn_train.data.decode import (
    FLOAT_AS_IS,
    SCALED_16BIT,
    SCALED_32BIT_INT,
    ImageDecodeError,
    ImageRangeError,
    SaidOnce,
    apply_orientation,
    orient_to,
    read_image,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
# A smooth picture as well: JPEG's chroma subsampling and PIL's quantiser behave differently on noise.
SMOOTH = np.stack([*np.meshgrid(np.linspace(0, 255, 40), np.linspace(0, 255, 30)), np.full((30, 40), 90.0)], -1).astype(
    np.uint8
)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# name -> how the file is written; every one must decode to what PIL's convert("RGB") gives.
FILES = {
    "rgb.png": lambda p: _save(p, Image.fromarray(RGB)),
    "gray.png": lambda p: _save(p, Image.fromarray(RGB[..., 0])),
    "gray_alpha.png": lambda p: _save(p, Image.fromarray(RGB[..., 0]).convert("LA")),
    "rgba.png": lambda p: _save(p, Image.fromarray(np.dstack([RGB, RGB[..., :1]]))),
    "palette.png": lambda p: _save(p, Image.fromarray(SMOOTH).convert("P", palette=Image.Palette.ADAPTIVE)),
    "palette_transparent.png": lambda p: _save(
        p, Image.fromarray(SMOOTH).convert("P", palette=Image.Palette.ADAPTIVE), transparency=3
    ),
    "bilevel.png": lambda p: _save(p, Image.fromarray(RGB[..., 0] > 128)),
    "rgb.jpg": lambda p: _save(p, Image.fromarray(SMOOTH), quality=90),
    "rgb_420.jpg": lambda p: _save(p, Image.fromarray(RGB), quality=75, subsampling=2),
    "progressive.jpg": lambda p: _save(p, Image.fromarray(SMOOTH), quality=80, progressive=True),
    "gray.jpg": lambda p: _save(p, Image.fromarray(SMOOTH[..., 0]), quality=90),
    "cmyk.jpg": lambda p: _save(p, Image.fromarray(SMOOTH).convert("CMYK"), quality=90),
    "rgb.bmp": lambda p: _save(p, Image.fromarray(RGB)),
    "rgb.tif": lambda p: _save(p, Image.fromarray(RGB)),
    "rgb.webp": lambda p: _save(p, Image.fromarray(RGB), lossless=True),
    "palette.gif": lambda p: _save(p, Image.fromarray(SMOOTH).convert("P")),
}


def pil_rgb(path: Path) -> torch.Tensor:
    """What the datasets gave before torchvision.io: PIL's convert("RGB"), as [3, H, W] uint8."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("name", list(FILES))
def test_every_colour_mode_decodes_to_pils_rgb(name: str, tmp_path: Path) -> None:
    path = FILES[name](tmp_path / name)
    decoded = read_image(path)
    assert decoded.image.dtype == torch.uint8 and decoded.note is None
    assert torch.equal(decoded.image, pil_rgb(path))
    # Stored pixel-interleaved, as `from_numpy(hwc).permute(2, 0, 1)` was: the model's ops see the same layout.
    assert decoded.image.shape == (3, 30, 40) and decoded.image.permute(1, 2, 0).is_contiguous()
    assert torch.equal(read_image(path, use_torchvision=False).image, decoded.image)


@pytest.mark.parametrize("name", ["rgb.png", "palette.png", "rgb.jpg", "gray.jpg"])
def test_jpeg_and_png_go_through_torchvision(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = FILES[name](tmp_path / name)
    monkeypatch.setattr(decode, "_pil_decode", lambda p: pytest.fail(f"PIL decoded {p}"))
    assert torch.equal(read_image(path).image, pil_rgb(path))


def test_cmyk_jpeg_is_left_to_pil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = FILES["cmyk.jpg"](tmp_path / "cmyk.jpg")
    used = []
    real = decode._pil_decode
    monkeypatch.setattr(decode, "_pil_decode", lambda p: used.append(p) or real(p))
    read_image(path)
    assert used == [path]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
@pytest.mark.parametrize("name", ["rgb.png", "rgb.jpg"])
def test_a_damaged_file_gives_pils_reason(name: str, damage: str, tmp_path: Path) -> None:
    path = FILES[name](tmp_path / name)
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": data[:3] + bytes(range(200)), "empty": b""}[damage]
    )
    with pytest.raises(ImageDecodeError) as err:
        read_image(path)
    assert "decode_" not in str(err.value) and "\n" not in str(err.value)  # PIL's sentence, not torchvision's


# ---------------------------------------------------------------- deeper than 8 bits
DEEP = np.linspace(9252, 37265, 30 * 40).reshape(30, 40).astype(np.uint16)  # the microscopy range


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = _save(tmp_path / "deep.png", Image.fromarray(DEEP))
    expected = torch.from_numpy(DEEP.astype(np.float32) / np.float32(65535))[None].expand(3, -1, -1)
    for use_torchvision in (True, False):  # torchvision's uint16, and PIL's I;16
        decoded = read_image(path, use_torchvision=use_torchvision)
        assert decoded.note == SCALED_16BIT and decoded.image.dtype == torch.float32
        assert torch.equal(decoded.image, expected)
        assert decoded.image.permute(1, 2, 0).is_contiguous()


def test_16_bit_png_as_older_torchvision_decodes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 0.21 torchvision gave 16-bit PNGs as int32: the same scale applies."""
    path = _save(tmp_path / "deep.png", Image.fromarray(DEEP))
    real = decode.decode_png
    monkeypatch.setattr(decode, "decode_png", lambda data, mode: real(data, mode=mode).to(torch.int32))
    decoded = read_image(path)
    assert decoded.note == SCALED_16BIT and torch.equal(decoded.image, read_image(path, use_torchvision=False).image)


def _png_16bit_rgb(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit RGB PNG (PIL cannot write one): IHDR, one IDAT of unfiltered big-endian rows, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def test_16_bit_rgb_png_keeps_its_colours(tmp_path: Path) -> None:
    deep_rgb = np.stack([DEEP, DEEP // 2, 65535 - DEEP], axis=-1)
    decoded = read_image(_png_16bit_rgb(tmp_path / "deep_rgb.png", deep_rgb))
    assert decoded.note == SCALED_16BIT
    assert torch.equal(
        decoded.image, torch.from_numpy(deep_rgb.astype(np.float32) / np.float32(65535)).permute(2, 0, 1)
    )


def test_32_bit_integer_images_within_16_bits_are_scaled(tmp_path: Path) -> None:
    path = _save(tmp_path / "int32.tif", Image.fromarray(DEEP.astype(np.int32)))
    decoded = read_image(path)
    assert decoded.note == SCALED_32BIT_INT
    assert torch.equal(decoded.image[0], torch.from_numpy(DEEP.astype(np.float32) / np.float32(65535)))
    _save(path, Image.fromarray(DEEP.astype(np.int32) * 4))
    with pytest.raises(ImageRangeError, match="32-bit integer values from 37008 to 149060.*convert the images"):
        read_image(path)


def test_32_bit_float_images_in_the_unit_range_are_taken_as_they_are(tmp_path: Path) -> None:
    values = DEEP.astype(np.float32) / 65535
    path = _save(tmp_path / "float.tif", Image.fromarray(values))
    decoded = read_image(path)
    assert decoded.note == FLOAT_AS_IS and torch.equal(decoded.image[2], torch.from_numpy(values))
    for bad, words in ((values * 4, "from 0.56"), (np.where(values > 0.3, np.nan, values), "not finite")):
        _save(path, Image.fromarray(bad.astype(np.float32)))
        with pytest.raises(ImageRangeError, match=words):
            read_image(path)


# ---------------------------------------------------------------- EXIF orientation
def _with_orientation(path: Path, array: np.ndarray, orientation: int) -> Path:
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_pixels_as_pil_does(orientation: int, tmp_path: Path) -> None:
    path = _with_orientation(tmp_path / "photo.jpg", SMOOTH, orientation)
    stored = read_image(path).image
    with Image.open(path) as im:
        turned = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(apply_orientation(stored, orientation), turned)


def test_exif_orientation_is_applied_only_where_it_alone_matches(tmp_path: Path) -> None:
    path = _with_orientation(tmp_path / "photo.jpg", SMOOTH, 6)  # stored 40x30, displayed 30x40
    stored = read_image(path).image
    assert orient_to(stored, path, (30, 40)) == (stored, 1)  # the stored size: taken as stored, as COCO does
    turned, orientation = orient_to(stored, path, (40, 30))
    assert orientation == 6 and turned.shape == (3, 40, 30) and turned.permute(1, 2, 0).is_contiguous()
    assert orient_to(stored, path, (50, 50)) == (None, 6)
    plain = _save(tmp_path / "plain.jpg", Image.fromarray(SMOOTH))
    assert orient_to(read_image(plain).image, plain, (40, 30)) == (None, 1)


# ---------------------------------------------------------------- said once
def _raise_in_child(said: SaidOnce) -> None:
    said.first(2)


def test_said_once_spans_worker_processes() -> None:
    said = SaidOnce()
    child = multiprocessing.get_context("fork").Process(target=_raise_in_child, args=(said,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert not said.first(2), "the worker's flag did not reach the parent"
    assert said.first(0) and not said.first(0)
    copy = pickle.loads(pickle.dumps(said))  # not a worker start: a copy with its own flags
    assert not copy.first(0) and copy.first(1) and said.first(1)
