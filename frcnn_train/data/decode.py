"""Image files to tensors: uint8 [3, H, W] RGB for 8-bit images, float32 [3, H, W] in [0, 1] for deeper ones.

JPEG and PNG are decoded by torchvision.io (libjpeg-turbo, libpng: about twice PIL's speed,
with no PIL object in between); every other format, and any file torchvision.io cannot
decode, goes through PIL, whose error then names the problem. Both give the RGB that
`PIL.Image.convert("RGB")` gives for grayscale, palette, RGBA and CMYK files (CMYK JPEGs are
left to PIL, so their colours do not depend on torchvision's conversion).

Images of more than 8 bits are scaled, never clipped: 16-bit values are divided by 65535
and kept as float32 (their precision would not survive uint8); 32-bit integer images whose
values fit in 16 bits are treated as 16-bit; 32-bit float images in [0, 1] are taken as they
are. Anything else is refused, naming the file: there is no scale to guess.
"""

from __future__ import annotations

import multiprocessing
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

try:
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png
except ImportError:  # a torchvision without its image codecs (deprecated in 0.29): PIL decodes everything
    decode_jpeg = decode_png = None  # type: ignore[assignment]

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UINT16_MAX = 65535.0
# The image files read_image reads (lower case): what `predict` collects from a directory and names in its
# messages, and what a dataset's images may be (COCO's file_name is taken as given; these are the formats
# the tests decode: 8/16-bit PNG, JPEG, BMP, TIFF (8, 16 and 32 bits), WebP).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# What a dataset says once (see SaidOnce): one flag each.
SCALED_16BIT, SCALED_32BIT_INT, FLOAT_AS_IS, EXIF_APPLIED = range(4)


class ImageDecodeError(ValueError):
    """The file is not an image both decoders can read; the message is PIL's (or torchvision's) reason."""


class ImageRangeError(ValueError):
    """A 32-bit image whose values have no scale to [0, 1] that could be assumed."""


@dataclass
class Decoded:
    image: Tensor  # uint8 or float32 [3, H, W]
    note: int | None = None  # SCALED_16BIT, ... : what was done to reach the model's range


def read_image(path: str | Path, *, use_torchvision: bool = True) -> Decoded:
    """Decode `path` (see the module docstring); raises ImageDecodeError or ImageRangeError."""
    data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))  # writable, and no copy on the way to the decoder
    head = data[:8].numpy().tobytes()
    if use_torchvision and decode_png is not None and (head.startswith(JPEG_MAGIC) or head.startswith(PNG_MAGIC)):
        try:
            decoded = _torchvision_decode(data, jpeg=head.startswith(JPEG_MAGIC))
        except RuntimeError:
            decoded = None  # truncated, corrupt or unsupported: PIL decides, and its message is the clearer one
        if decoded is not None:
            return decoded
    return _pil_decode(path)


def _torchvision_decode(data: Tensor, *, jpeg: bool) -> Decoded | None:
    """None: a file PIL should decode (a CMYK JPEG)."""
    with warnings.catch_warnings():
        # torchvision 0.29 marks its codecs deprecated on every call; they still work, and PIL takes over once gone.
        warnings.simplefilter("ignore", DeprecationWarning)
        if jpeg:
            image = decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
            if image.shape[0] == 1:  # grayscale: R = G = B, as PIL's convert("RGB")
                return Decoded(pixel_interleaved(image.expand(3, -1, -1)))
            return Decoded(pixel_interleaved(image)) if image.shape[0] == 3 else None
        image = decode_png(data, mode=ImageReadMode.RGB)
    image = pixel_interleaved(image)
    if image.dtype == torch.uint8:
        return Decoded(image)
    # 16-bit PNG: uint16 from torchvision 0.21 on, int32 in some older releases; both hold 0..65535.
    return Decoded(image.to(torch.float32).div_(UINT16_MAX), SCALED_16BIT)


def _pil_decode(path: str | Path) -> Decoded:
    try:
        with Image.open(path) as im:
            return from_pil(im)
    except (ImageRangeError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ... for bad files
        raise ImageDecodeError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


def from_pil(im: Image.Image) -> Decoded:
    """A PIL image as a file of it decodes (see the module docstring): the Python API takes PIL images too."""
    if im.mode.startswith("I;16"):
        return Decoded(_gray_to_rgb(np.asarray(im).astype(np.float32) / np.float32(UINT16_MAX)), SCALED_16BIT)
    if im.mode == "I":
        return Decoded(_scaled_int32(np.asarray(im)), SCALED_32BIT_INT)
    if im.mode == "F":
        return Decoded(_float_as_is(np.asarray(im)), FLOAT_AS_IS)
    array = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return Decoded(torch.from_numpy(array).permute(2, 0, 1))


def pixel_interleaved(image: Tensor) -> Tensor:
    """[C, H, W] stored as H x W x C, the layout `torch.from_numpy(hwc_array).permute(2, 0, 1)` has: every
    decoder gives it, so the model's ops (the resize's interpolation among them) see the layout they
    always saw and compute the same values."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def _gray_to_rgb(array: np.ndarray) -> Tensor:
    return pixel_interleaved(torch.from_numpy(np.array(array, dtype=np.float32))[None].expand(3, -1, -1))


def _scaled_int32(array: np.ndarray) -> Tensor:
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0 or high > UINT16_MAX:
        raise ImageRangeError(
            f"holds 32-bit integer values from {low} to {high}, beyond the 16-bit range that can be scaled to "
            "[0, 1]; convert the images to 8 or 16 bits, scaled as the model should see them"
        )
    return _gray_to_rgb(array.astype(np.float32) / np.float32(UINT16_MAX))


def _float_as_is(array: np.ndarray) -> Tensor:
    finite = np.isfinite(array).all()
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if not finite or low < 0.0 or high > 1.0:
        raise ImageRangeError(
            f"holds 32-bit float values {'that are not finite' if not finite else f'from {low:g} to {high:g}'}, "
            "outside [0, 1], with no scale to assume; convert the images to floats in [0, 1] or to 8 or 16 bits"
        )
    return _gray_to_rgb(array)


NOTES = {
    SCALED_16BIT: "16-bit images (first: {path}) are scaled to [0, 1] by dividing by 65535 (not clipped), and "
    "travel as float32 to keep their precision",
    SCALED_32BIT_INT: "32-bit integer images (first: {path}) hold 16-bit values: scaled to [0, 1] by dividing by "
    "65535, as float32",
    FLOAT_AS_IS: "32-bit float images (first: {path}) are taken as they are: their values lie in [0, 1]",
    EXIF_APPLIED: "images whose EXIF orientation turns them to the width/height the annotations give (first: "
    "{path}, orientation {orientation}) are turned as annotation tools display them",
}


class SaidOnce:
    """Flags a dataset shares with its DataLoader workers, so a note is logged once per dataset, not once per
    worker process. Shared memory survives fork and a spawning DataLoader; any other copy gets its own flags."""

    def __init__(self, count: int = len(NOTES)) -> None:
        self._flags = multiprocessing.RawArray("b", count)

    def first(self, flag: int) -> bool:
        """True the first time `flag` is raised (two workers racing may both see True: said twice, harmless)."""
        if self._flags[flag]:
            return False
        self._flags[flag] = 1
        return True

    def __getstate__(self) -> dict:
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is not None:  # starting a worker process: share the memory
            return {"flags": self._flags}
        return {"flags": None, "values": list(self._flags)}

    def __setstate__(self, state: dict) -> None:
        if state["flags"] is not None:
            self._flags = state["flags"]
        else:
            self._flags = multiprocessing.RawArray("b", state["values"])


# ---------------------------------------------------------------- EXIF orientation
EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(path: str | Path) -> int:
    """The file's EXIF orientation (1-8; 1 when it has none or cannot say)."""
    try:
        with Image.open(path) as im:
            value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1
    return int(value) if value in range(1, 9) else 1


def apply_orientation(image: Tensor, orientation: int) -> Tensor:
    """[C, H, W] turned as EXIF orientation 1-8 says (what PIL.ImageOps.exif_transpose does to pixels)."""
    ops = {
        1: lambda x: x,
        2: lambda x: x.flip(-1),
        3: lambda x: x.flip(-2, -1),
        4: lambda x: x.flip(-2),
        5: lambda x: x.transpose(-2, -1),
        6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
        7: lambda x: x.transpose(-2, -1).flip(-2, -1),
        8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    }
    return pixel_interleaved(ops[orientation](image))


def orient_to(image: Tensor, path: str | Path, size: tuple[int, int]) -> tuple[Tensor | None, int]:
    """`image` at the annotations' (height, width), and the EXIF orientation applied to reach it (1: none).

    Where the stored pixels have that size they are taken as stored, as COCO does (its annotations
    are on the stored pixels, whatever the EXIF says). Where only the image turned by its EXIF
    orientation has it, the annotations were made on the image as displayed (annotation tools and
    Ultralytics turn it), so it is turned. Neither: (None, the file's quarter-turn orientation or 1).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image, 1
    orientation = exif_orientation(path)
    if orientation not in (5, 6, 7, 8):  # only a quarter turn (with or without a mirror) swaps width and height
        return None, 1
    if tuple(image.shape[-2:]) != tuple(size)[::-1]:
        return None, orientation
    return apply_orientation(image, orientation), orientation
