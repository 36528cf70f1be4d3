"""`frcnn-export CKPT --format onnx|torchscript [--out FILE] [--dynamic] [--raw]`: a checkpoint as a deployable file.

The file holds the whole detector in eval mode, rebuilt from the checkpoint's
config: preprocessing (resize to the model's size, normalisation), backbone and
heads, and postprocessing (box decoding, NMS, mask pasting back to the image).
Input: one image, float32 [3, H, W], RGB in [0, 1]. Outputs: boxes [N, 4] (x1, y1,
x2, y2 in input pixels), labels [N] (int64, 1-based: class names[label - 1]),
scores [N], and for Mask R-CNN masks [N, 1, H, W] (probabilities). Class names,
the architecture fingerprint, the frcnn_train version and which weights (EMA or
raw) are stored in the file (ONNX metadata_props; TorchScript extra file
`frcnn_train.json`). After writing, the file is run on the checkpoint's own
validation images (onnxruntime / torch.jit.load) and compared with the PyTorch
model (export_check.py). CKPT may also be `torchvision:<builder>[.<ENUM>]`: torchvision's
COCO weights (zoo.from_torchvision), traced and checked on generated shapes images at
the model's own size.

Both formats are traces of torchvision's classes (models/export_view.py), made
with the TorchScript-based ONNX exporter (`dynamo=False`) as torchvision's own
ONNX tests do: its default dynamo exporter stops at torchvision's data-dependent checks.
One image per call: torchvision's detectors take a list of images, whose length a
trace fixes.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from frcnn_train import __version__, checkpoint, outputs, zoo
from frcnn_train.errors import ExportError, UserError
from frcnn_train.evaluate import apply_overrides, load_model
from frcnn_train.export_check import CheckReport, check_export, synthetic_image, validation_images
from frcnn_train.models import architecture_spec, fingerprint
from frcnn_train.models.export_view import for_export
from frcnn_train.runtime import cli, prog_name, resolve_device

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# torchvision's nms / roi_align convert from opset 11 on, roi_align naming its coordinate mode
# (output_half_pixel for aligned=False) from 16 on; every onnxruntime since 1.11 runs 17.
ONNX_OPSET = 17
INPUT_NAME = "image"
TORCHSCRIPT_METADATA = outputs.TORCHSCRIPT_METADATA  # the TorchScript extra file holding the metadata
INSTALL_HINT = 'pip install "frcnn_train[export]"'


def output_names(arch: str) -> tuple[str, ...]:
    return ("boxes", "labels", "scores") + (("masks",) if arch == "mask_rcnn" else ())


class Deployable(nn.Module):
    """One image in, the detections as a tuple out: the interface both file formats share."""

    def __init__(self, detector: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.detector = detector
        self.outputs = outputs

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        detections = self.detector([image])[0]
        return tuple(detections[name] for name in self.outputs)


def require_onnx() -> None:
    """onnx (to write the metadata) and onnxruntime (to check the file) are an optional extra."""
    missing = []
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(
            f"--format onnx needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed; install the export extra: {INSTALL_HINT}"
        )


def resolve_out(ckpt_path: Path, fmt: str, out: str | Path | None) -> Path:
    """--out, or the checkpoint's name with the format's suffix beside it; checked before any work: anything
    but an earlier export of this format there is refused, and so is a directory that cannot be written."""
    default = ckpt_path.with_name(ckpt_path.stem + SUFFIXES[fmt])
    path = Path(out).expanduser() if out else default
    if path.is_dir():
        example = path / (ckpt_path.stem + SUFFIXES[fmt])
        raise UserError(f"--out {path} is a directory; give a file name, e.g. {example}")
    outputs.check_file(
        path, kind=fmt, command="frcnn-export", example=default, reads={ckpt_path: "the checkpoint it exports"}
    )
    return path


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best.pth (else last.pth), as evaluate takes."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "best.pth" if (path / "best.pth").exists() else path / "last.pth"
    return path


@dataclass
class ExportResult:
    path: Path
    format: str
    weights: str  # "ema" or "raw"
    seconds: float
    input_shape: list[int]  # [3, H, W] of the example; H and W are fixed unless dynamic
    metadata: dict[str, Any]
    check: CheckReport | None
    has_ema: bool  # the checkpoint holds EMA weights that were updated (exported unless --raw)
    device: str  # where the model was traced (a TorchScript trace runs there only)


@dataclass
class Source:
    """What is exported: a checkpoint's model, or a torchvision zoo model, with what the metadata says of it."""

    model: nn.Module
    cfg: Any
    classes: list[str]
    fingerprint: str | None
    weights: str  # "ema", "raw", or the torchvision source
    name: str  # the checkpoint's file name, or the torchvision source
    global_step: int | None
    has_ema: bool
    path: Path  # where the default output goes beside


def open_source(source: str | Path, *, raw: bool, overrides: Sequence[str] = ()) -> Source:
    """A checkpoint (file or run directory), or `torchvision:<builder>[.<ENUM>]`; `overrides` (data=, data.*)
    say where the check images are, as evaluate takes them."""
    if zoo.is_zoo_source(str(source)):
        model, classes, cfg = zoo.from_torchvision(str(source))
        # No validation split of its own: generated shapes images at the model's size make the trace and the check.
        shapes = cfg.data.shapes
        shapes.image_size, shapes.num_train, shapes.num_val = int(cfg.model.min_size), 1, 16
        cfg = apply_overrides(
            OmegaConf.to_container(cfg, resolve=True), overrides, command="export", allowed=(), source=str(source)
        )
        builder = str(source).split(":", 1)[1]
        digest = fingerprint(architecture_spec(cfg.model), model)
        return Source(
            model=model,
            cfg=cfg,
            classes=classes,
            fingerprint=digest,
            weights=str(source),
            name=str(source),
            global_step=None,
            has_ema=False,
            path=Path(builder + ".pth"),
        )
    path = checkpoint_file(source)
    ckpt = checkpoint.load_checkpoint(path)
    cfg = apply_overrides(
        ckpt["config"], overrides, command="export", allowed=(), source=str(path), versions=ckpt.get("versions")
    )
    return Source(
        model=load_model(ckpt, cfg, str(path), raw=raw),
        cfg=cfg,
        classes=list(ckpt["classes"]),
        fingerprint=ckpt["architecture"].get("fingerprint"),
        weights=checkpoint.inference_weights(ckpt, raw=raw)[1],
        name=path.name,
        global_step=ckpt["trainer"].get("global_step"),
        has_ema=bool(ckpt.get("ema")) and checkpoint.ema_skipped(ckpt) is None,
        path=path,
    )


def build_metadata(source: Source, arch: str, *, dynamic: bool, input_shape: list[int]) -> dict[str, Any]:
    return {
        "format": outputs.EXPORT_MARKER,
        "frcnn_train_version": __version__,
        "arch": arch,
        "classes": list(source.classes),
        "fingerprint": source.fingerprint,
        "weights": source.weights,
        "checkpoint": source.name,
        "global_step": source.global_step,
        "input": f"{INPUT_NAME}: float32 [3, H, W], RGB in [0, 1]",
        "input_size": None if dynamic else input_shape[1:],
        "outputs": list(output_names(arch)),
    }


def _onnx_bytes(
    module: nn.Module, example: Tensor, names: tuple[str, ...], dynamic: bool, metadata: dict[str, Any]
) -> bytes:
    import onnx

    detections = {name: {0: "detections"} for name in names}  # the count always varies
    axes: dict[str, dict[int, str]] = dict(detections)
    if dynamic:
        axes[INPUT_NAME] = {1: "height", 2: "width"}
        if "masks" in axes:
            axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    kwargs: dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buffer,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=list(names),
        dynamic_axes=axes,
        do_constant_folding=True,
        **kwargs,
    )
    proto = onnx.load_from_string(buffer.getvalue())
    _forget_loop_shapes(proto.graph)
    # metadata_props are strings: lists and numbers as JSON.
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    proto.doc_string = f"frcnn_train {metadata['arch']} export; see metadata_props"
    return proto.SerializeToString()


def _forget_loop_shapes(graph: Any) -> None:
    """Drop the shapes the trace recorded for values a Loop carries (Mask R-CNN's mask pasting grows one
    by a mask per detection): onnxruntime warned once per detection that [1, H, W] was expected."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                if node.op_type == "Loop":  # body inputs: iteration, condition, carried; outputs: condition, carried
                    for value in [*attribute.g.input[2:], *attribute.g.output[1:]]:
                        value.type.tensor_type.ClearField("shape")
                _forget_loop_shapes(attribute.g)


def _torchscript_bytes(module: nn.Module, example: Tensor, metadata: dict[str, Any]) -> bytes:
    traced = torch.jit.trace(module, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
    return buffer.getvalue()


def _describe_model(cfg: Any) -> str:
    attention = cfg.model.attention.type
    return f"{cfg.model.arch} with {cfg.model.backbone.name}" + (
        f" and {attention} attention" if attention != "none" else ""
    )


def export(
    ckpt_path: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    dynamic: bool = False,
    raw: bool = False,
    device: str = "cpu",
    check_images: int = 16,
    overrides: Sequence[str] = (),
) -> ExportResult:
    """Write the checkpoint's detector as `fmt` and check it on `check_images` validation images, found through
    the checkpoint's data config with `overrides` (data=, data.*) as evaluate takes them. With 0 no image is
    read: the trace follows a synthetic model.min_size square and nothing is checked."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} is not an export format; choose one of {', '.join(FORMATS)}")
    if check_images < 0:
        raise UserError(f"--check-images {check_images} must be 0 (no check) or more")
    if fmt == "onnx":
        if device != "cpu":
            raise UserError(
                f"--device {device} applies to --format torchscript (a trace is bound to its device); "
                "an ONNX file is exported on the CPU and runs wherever onnxruntime does, so drop --device"
            )
        require_onnx()
    elif device != "cpu" and not torch.cuda.is_available():
        raise UserError(
            f"--device {device} but CUDA is not available here; trace for the GPU on a machine with one, "
            "or use --device cpu"
        )
    source = open_source(ckpt_path, raw=raw, overrides=overrides)
    out_path = resolve_out(source.path, fmt, out)
    dev = resolve_device(device)
    cfg, weights = source.cfg, source.weights
    arch = cfg.model.arch
    model = source.model.to(dev)
    # The example the trace follows, and the check's images: the checkpoint's own validation split.
    images = validation_images(cfg, check_images) if check_images else [synthetic_image(cfg.model.min_size)]
    example = images[0].to(dev)
    names = output_names(arch)
    metadata = build_metadata(source, arch, dynamic=dynamic, input_shape=list(example.shape))
    module = Deployable(for_export(model), names)
    start = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about torchvision's own tracing branches
            data = (
                _onnx_bytes(module, example, names, dynamic, metadata)
                if fmt == "onnx"
                else _torchscript_bytes(module, example, metadata)
            )
    except Exception as err:  # noqa: BLE001 - exporters raise many types; the sentence names the combination
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"{_describe_model(cfg)} cannot be exported to {fmt} with torch {torch.__version__} "
            f"({first[:300]}); try the other format"
        ) from err
    seconds = time.perf_counter() - start
    outputs.write_file(out_path, data)
    report = None
    if check_images:
        report = check_export(
            out_path,
            fmt,
            model,
            images[:check_images],
            names,
            input_size=None if dynamic else list(example.shape[1:]),
            device=dev,
        )
    return ExportResult(
        path=out_path,
        format=fmt,
        weights=weights,
        seconds=seconds,
        input_shape=list(example.shape),
        metadata=metadata,
        check=report,
        has_ema=source.has_ema,
        device=str(dev),
    )


def describe(result: ExportResult) -> str:
    also_ema = " (--raw; the checkpoint also has EMA weights)" if result.has_ema else ""
    weights = (
        "the EMA weights (--raw exports the trained ones)"
        if result.weights == "ema"
        else f"the trained (raw) weights{also_ema}"
        if result.weights == "raw"
        else f"{result.weights}'s weights"
    )
    h, w = result.input_shape[1:]
    size = (
        "any height and width (--dynamic)"
        if result.metadata["input_size"] is None
        else f"{h}x{w} only (--dynamic for any size)"
        if result.format == "onnx"
        else f"traced and checked at {h}x{w} (--dynamic checks a second size too)"
    )
    fmt = f"ONNX opset {ONNX_OPSET}" if result.format == "onnx" else f"TorchScript, a trace for {result.device}"
    return (
        f"exported {result.path} ({fmt}, {result.metadata['arch']}, {weights}) in {result.seconds:.1f} s\n"
        f"input {INPUT_NAME}: float32 [3, H, W] RGB in [0, 1], {size}; "
        f"outputs: {', '.join(result.metadata['outputs'])}; {len(result.metadata['classes'])} class names "
        f"and the fingerprint in the file's metadata"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; docs/ generates the command-line reference from it."""
    parser = argparse.ArgumentParser(prog=prog_name("frcnn_train.export"), description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help=zoo.SOURCE_HELP)
    parser.add_argument(
        "overrides", nargs="*", help="data=..., data.*=...: where the check images are, as evaluate takes them"
    )
    parser.add_argument("--format", required=True, help="onnx (run with onnxruntime) or torchscript (torch.jit.load)")
    parser.add_argument(
        "--out",
        help="file to write (default: beside the checkpoint, <name>.onnx or "
        "<name>.torchscript.pt); an existing file is replaced only if it is an earlier "
        "export of the same format",
    )
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="any input height and width: ONNX with dynamic axes, and the check also runs at a "
        "second size; without it the ONNX file takes only the size it was exported at (the "
        "validation images' size, printed and stored in the metadata). One image per call "
        "either way",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="export the trained weights even when the checkpoint has EMA weights (the default when it has them)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torchscript only: cpu, cuda or cuda:N, where the model is traced and checked; the "
        "trace runs on that device only (default cpu). ONNX files are device-free",
    )
    parser.add_argument(
        "--check-images",
        type=int,
        default=16,
        help="validation images to compare the file with the PyTorch model on (0: no check and no "
        "data read; the trace follows a synthetic model.min_size square image)",
    )
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = export(
        args.checkpoint,
        args.format,
        args.out,
        dynamic=args.dynamic,
        raw=args.raw,
        device=args.device,
        check_images=args.check_images,
        overrides=args.overrides,
    )
    print(describe(result))
    if result.check is None:
        h, w = result.input_shape[1:]
        print(f"not checked (--check-images 0): traced on a synthetic {h}x{w} image, no data read")
        return 0
    print(result.check.summary())
    return 0 if result.check.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
