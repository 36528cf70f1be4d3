"""Data path speed: image decoding (PIL against torchvision.io, nvjpeg on CUDA) and the training loader.

    python scripts/data_speed.py decode                     # shapes PNGs (96 and 640 px) and 640x480 JPEGs
    python scripts/data_speed.py decode --device cuda       # adds nvjpeg: decode_jpeg(batch, device="cuda")
    python scripts/data_speed.py loader --workers 2         # persistent workers against a new loader per epoch
    python scripts/data_speed.py loader --workers 8 --size 640 --pin   # as a CUDA run loads (pinned batches)
    python scripts/data_speed.py loader --workers 8 --size 640 --pin --float   # the float32 batches of before

`decode` prints CPU milliseconds per image (median of --repeats passes over the files) for: PIL as the
datasets decoded before (convert("RGB"), then float32 in [0, 1] on the CPU), PIL to uint8, and
frcnn_train.data.decode.read_image (torchvision.io for JPEG/PNG, uint8 out). `loader` prints
images/s of the train loader over --epochs short epochs, and the wait for each epoch's first batch.
The files are generated under --cache (the shapes generator for PNGs, smooth photos for JPEGs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frcnn_train.data import CocoDetection, TrainLoader, build_train_loader  # noqa: E402
from frcnn_train.data.decode import read_image  # noqa: E402
from frcnn_train.data.shapes import ensure_shapes_dataset  # noqa: E402


def shapes(cache: Path, size: int, count: int) -> Path:
    return ensure_shapes_dataset(cache / "shapes", num_train=count, num_val=1, image_size=size, max_objects=4, seed=0)


def jpegs(cache: Path, count: int, width: int = 640, height: int = 480) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, shapes and grain; quality 90, 4:2:0 as cameras write them)."""
    out = cache / f"jpeg_{width}x{height}"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = out / f"{i:04d}.jpg"
        if not path.exists():
            y, x = np.mgrid[0:height, 0:width].astype(np.float32)
            base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
            base += rng.normal(0, 12, base.shape)
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def pil_float(path: Path) -> torch.Tensor:
    """What CocoDetection did before: PIL, RGB, float32 in [0, 1] on the worker."""
    with Image.open(path) as im:
        image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    return image.permute(2, 0, 1).float().div_(255.0)


def pil_uint8(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def ms_per_image(fn, paths: list[Path], repeats: int) -> float:
    """CPU milliseconds per image (this process's CPU time, so other load on the host does not count)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for path in paths:
            fn(path)
        times.append((time.process_time() - start) / len(paths) * 1e3)
    return statistics.median(times)


def nvjpeg_ms_per_image(paths: list[Path], repeats: int, batch: int, device: str) -> float:
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        decode_jpeg(datas[:batch], mode=ImageReadMode.RGB, device=device)  # warm-up: nvjpeg handles, allocations
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(datas), batch):
                images = decode_jpeg(datas[i : i + batch], mode=ImageReadMode.RGB, device=device)
                [image.float().div_(255.0) for image in images]
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / len(datas) * 1e3)
    return statistics.median(times)


def decode_table(args: argparse.Namespace) -> None:
    sets = {
        f"shapes PNG {size} px": sorted((shapes(args.cache, size, args.count) / "train").glob("*.png"))
        for size in (96, 640)
    }
    sets["JPEG 640x480 q90"] = jpegs(args.cache, args.count)
    print(
        f"{'files':<22}{'PIL->float32':>14}{'PIL->uint8':>12}{'read_image':>12}{'speed-up':>10}"
        + (f"{'nvjpeg':>10}" if args.device.startswith("cuda") else "")
        + "   (CPU ms per image, median; nvjpeg: wall)"
    )
    for name, paths in sets.items():
        before = ms_per_image(pil_float, paths, args.repeats)
        pil = ms_per_image(pil_uint8, paths, args.repeats)
        ours = ms_per_image(lambda p: read_image(p).image, paths, args.repeats)
        row = f"{name:<22}{before:14.3f}{pil:12.3f}{ours:12.3f}{before / ours:9.2f}x"
        if args.device.startswith("cuda") and name.startswith("JPEG"):
            row += f"{nvjpeg_ms_per_image(paths, args.repeats, args.batch, args.device):10.3f}"
        print(row)


class AsFloat(torch.utils.data.Dataset):
    """The images as the loader carried them before: float32 in [0, 1], made on the worker."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        image, target = self.dataset[key]
        return image.float().div_(255.0), target


def loader_table(args: argparse.Namespace) -> None:
    root = shapes(args.cache, args.size, args.count)
    dataset = CocoDetection(root / "train", root / "instances_train.json", with_masks=args.masks, train=True)
    if args.float:
        dataset = AsFloat(dataset)
    common = dict(batch_size=args.batch, num_workers=args.workers, seed=0)

    def timed(epochs) -> tuple[float, list[float]]:
        images, firsts, start = 0, [], time.perf_counter()
        for batches in epochs:
            epoch_start = time.perf_counter()
            for i, (batch, _) in enumerate(batches):
                if i == 0:
                    firsts.append(time.perf_counter() - epoch_start)
                images += len(batch)
        return images / (time.perf_counter() - start), firsts

    fresh = timed(build_train_loader(dataset, epoch=e, pin_memory=args.pin, **common) for e in range(args.epochs))
    persistent_loader = TrainLoader(dataset, pin_memory=args.pin, prefetch_factor=args.prefetch, **common)
    persistent = timed(persistent_loader.at(e) for e in range(args.epochs))
    persistent_loader.close()
    print(
        f"{len(dataset)} shapes images of {args.size} px, batch {args.batch}, {args.workers} workers, "
        f"{args.epochs} epochs{', pinned' if args.pin else ''}{', masks' if args.masks else ''}, "
        f"{'float32 (as before)' if args.float else 'uint8'} images:"
    )
    for name, (rate, firsts) in (("new loader per epoch", fresh), ("persistent workers", persistent)):
        print(
            f"  {name:<22}{rate:8.1f} images/s   first batch of each epoch after "
            f"{statistics.median(firsts) * 1e3:6.1f} ms (median)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["decode", "loader"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/frcnn_data_speed"))
    parser.add_argument("--count", type=int, default=64, help="files per set (decode) / training images (loader)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="decode: cuda adds nvjpeg")
    parser.add_argument("--batch", type=int, default=8, help="images per nvjpeg call / per loader batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=96, help="loader: shapes image size")
    parser.add_argument("--prefetch", type=int, default=2, help="loader: batches each persistent worker loads ahead")
    parser.add_argument("--pin", action="store_true", help="loader: pinned batches, as on CUDA")
    parser.add_argument("--masks", action="store_true", help="loader: decode masks too (Mask R-CNN)")
    parser.add_argument("--float", action="store_true", help="loader: carry float32 images, as before (for comparison)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting: decode speed per core
    decode_table(args) if args.what == "decode" else loader_table(args)


if __name__ == "__main__":
    main()
