"""`frcnn-export`: ONNX and TorchScript files of both architectures that reproduce the PyTorch model, carry
their metadata, load without frcnn_train, and fail in one sentence."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_same_detections
from frcnn_train import checkpoint
from frcnn_train.config import with_schema
from frcnn_train.evaluate import load_model
from frcnn_train.export import export, main

pytest.importorskip("onnxruntime")  # the export extra, part of .[test]
# Loading a TorchScript file the way users do; recent torch warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")

ARCHS = {"faster": (), "mask": ("model=mask_rcnn",)}


@pytest.fixture(scope="module")
def runs(tiny_runs) -> dict[str, Path]:
    return {name: tiny_runs(name, *overrides) for name, overrides in ARCHS.items()}


def val_image_files(run_dir: Path) -> list[Path]:
    cfg = checkpoint.load_checkpoint(run_dir / "last.pth")["config"]
    return sorted(next(Path(cfg["data"]["cache_dir"], "shapes").glob("64px_8+4_*")).joinpath("val").glob("*.png"))


# Loading as the README shows: only numpy, PIL and onnxruntime / torch + torchvision; frcnn_train cannot be imported.
STANDALONE = r"""
import json, sys
sys.modules["frcnn_train"] = None  # any import of it fails
import numpy as np
from PIL import Image
fmt, path, image_path = sys.argv[1:4]
image = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"])
    outputs = session.run(None, {"image": image})
    names = [o.name for o in session.get_outputs()]
else:
    import torch, torchvision  # torchvision registers the nms / roi_align ops the file calls
    extra = {"frcnn_train.json": ""}
    model = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["frcnn_train.json"])
    classes = meta["classes"]
    tensor = torchvision.io.read_image(image_path, torchvision.io.ImageReadMode.RGB).float() / 255
    with torch.no_grad():
        outputs = [t.numpy() for t in model(tensor)]
    names = meta["outputs"]
result = dict(zip(names, outputs))
print(json.dumps({"meta": meta, "classes": classes, "shapes": {k: list(v.shape) for k, v in result.items()},
                  "labels": sorted(set(result["labels"].tolist())), "boxes": result["boxes"].tolist()}))
"""


def run_standalone(fmt: str, path: Path, image: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", STANDALONE, fmt, str(path), str(image)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "[W:onnxruntime" not in done.stderr, done.stderr  # e.g. a shape the trace recorded, per detection
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """exported(fmt, arch) -> (file, what the command printed): each exported once per module by the CLI."""
    out = tmp_path_factory.mktemp("exported")
    done: dict[tuple[str, str], tuple[Path, str]] = {}

    def get(fmt: str, arch: str) -> tuple[Path, str]:
        if (fmt, arch) not in done:
            path = out / f"{arch}.{fmt}"
            capture = io.StringIO()
            with contextlib.redirect_stdout(capture):
                code = main([str(runs[arch] / "last.pth"), "--format", fmt, "--out", str(path), "--check-images", "1"])
            assert code == 0, capture.getvalue()
            done[fmt, arch] = path, capture.getvalue()
        return done[fmt, arch]

    return get


@pytest.mark.parametrize(
    "fmt, arch",
    [
        ("onnx", "mask"),
        ("torchscript", "faster"),
        pytest.param("onnx", "faster", marks=pytest.mark.slow),
        pytest.param("torchscript", "mask", marks=pytest.mark.slow),
    ],
)
def test_export_checks_and_loads_without_frcnn_train(runs: dict[str, Path], exported, fmt: str, arch: str) -> None:
    run_dir = runs[arch]
    out, printed = exported(fmt, arch)
    assert f"exported {out}" in printed and "the trained (raw) weights" in printed
    check = printed.strip().splitlines()[-1]
    assert check.endswith("passed") and "largest box difference" in check, check
    if arch == "mask":
        assert "largest mask difference" in check

    ckpt = checkpoint.load_checkpoint(run_dir / "last.pth")
    loaded = run_standalone(fmt, out, val_image_files(run_dir)[0])
    meta = loaded["meta"]
    assert loaded["classes"] == ckpt["classes"]
    assert meta["fingerprint"] == ckpt["architecture"]["fingerprint"]
    assert (
        meta["weights"] == "raw"
        and meta["frcnn_train_version"]
        and meta["arch"] == with_schema(ckpt["config"]).model.arch
    )
    shapes = loaded["shapes"]
    count = shapes["boxes"][0]
    assert count > 0 and shapes["boxes"] == [count, 4] and shapes["labels"] == shapes["scores"] == [count]
    assert set(loaded["labels"]) <= set(range(1, len(ckpt["classes"]) + 1))
    if arch == "mask":
        assert shapes["masks"] == [count, 1, 64, 64]
    else:
        assert "masks" not in shapes


def test_dynamic_onnx_takes_another_size_and_the_fixed_one_refuses_it(
    runs: dict[str, Path], exported, tmp_path: Path
) -> None:
    import onnxruntime

    fixed, printed = exported("onnx", "mask")
    assert "(1 run at 64x64" in printed and "64x64 only (--dynamic for any size)" in printed
    dynamic = export(runs["mask"] / "last.pth", "onnx", tmp_path / "dynamic.onnx", dynamic=True, check_images=1)
    # The check ran the dynamic file at a second size too, and it matched there.
    assert dynamic.check.passed and dynamic.check.sizes == {(64, 64), (48, 80)} and dynamic.check.runs == 2
    assert dynamic.metadata["input_size"] is None
    other = torch.rand(3, 72, 100).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
    boxes, _, _, masks = session.run(None, {"image": other})
    assert boxes.shape[1] == 4 and (boxes[:, 2] <= 100 + 1e-3).all() and (boxes[:, 3] <= 72 + 1e-3).all()
    assert masks.shape == (len(boxes), 1, 72, 100)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        onnxruntime.InferenceSession(str(fixed), providers=["CPUExecutionProvider"]).run(None, {"image": other})


def test_ema_weights_are_exported_unless_raw(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    ckpt = checkpoint.load_checkpoint(runs["faster"] / "last.pth")
    ema = {k: v.clone() for k, v in ckpt["model"].items()}
    ema["roi_heads.box_predictor.bbox_pred.bias"] += 3.0  # shifts every box: the two sets of weights differ visibly
    ckpt["ema"] = {"model": ema}
    path = tmp_path / "with_ema.pth"
    checkpoint.save_checkpoint(ckpt, path)
    image = torch.rand(3, 64, 64)

    def detections(file: Path) -> dict[str, torch.Tensor]:
        extra = {"frcnn_train.json": ""}
        outputs = torch.jit.load(str(file), _extra_files=extra)(image)
        return dict(zip(json.loads(extra["frcnn_train.json"])["outputs"], outputs))

    # No check here (--check-images 0): the comparison below is the test's own.
    assert main([str(path), "--format", "torchscript", "--out", str(tmp_path / "ema.pt"), "--check-images", "0"]) == 0
    assert "the EMA weights (--raw exports the trained ones)" in capsys.readouterr().out
    assert (
        main([str(path), "--format", "torchscript", "--out", str(tmp_path / "raw.pt"), "--check-images", "0", "--raw"])
        == 0
    )
    assert "the trained (raw) weights (--raw; the checkpoint also has EMA weights)" in capsys.readouterr().out
    cfg = with_schema(ckpt["config"])
    with torch.no_grad():
        for file, raw in (("ema.pt", False), ("raw.pt", True)):
            expected = load_model(ckpt, cfg, "test", raw=raw)([image])[0]
            got = detections(tmp_path / file)
            # Traced torchvision classes against ours: equal up to float rounding, paired as export_check pairs.
            assert_same_detections(got, {k: expected[k] for k in got}, atol=1e-3)
    extra = {"frcnn_train.json": ""}
    torch.jit.load(str(tmp_path / "ema.pt"), _extra_files=extra)
    assert json.loads(extra["frcnn_train.json"])["weights"] == "ema"


def one_sentence(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tflite"], "--format tflite is not an export format; choose one of onnx, torchscript"),
        (["--format", "onnx", "--check-images", "-1"], "--check-images -1 must be 0 (no check) or more"),
        (["--format", "onnx", "--device", "cuda"], "--device cuda applies to --format torchscript"),
        pytest.param(
            ["--format", "torchscript", "--device", "cuda"],
            "--device cuda but CUDA is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_bad_arguments_are_one_sentence(runs: dict[str, Path], capsys, args: list[str], message: str) -> None:
    assert main([str(runs["faster"] / "last.pth"), *args]) == 2
    assert message in one_sentence(capsys)


def test_missing_checkpoint_and_directory_out_are_one_sentence(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nope.pth"), "--format", "torchscript"]) == 2
    assert f"{tmp_path / 'nope.pth'} does not exist" in one_sentence(capsys)
    assert main([str(runs["faster"] / "last.pth"), "--format", "torchscript", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory; give a file name" in one_sentence(capsys)
    assert not list(tmp_path.iterdir())


def test_missing_onnx_packages_say_what_to_install(runs: dict[str, Path], capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    assert main([str(runs["faster"] / "last.pth"), "--format", "onnx"]) == 2
    err = one_sentence(capsys)
    assert "--format onnx needs onnxruntime, which is not installed" in err
    assert 'pip install "frcnn_train[export]"' in err


def test_an_exporter_failure_names_the_combination(runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert main([str(runs["mask"] / "last.pth"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = one_sentence(capsys)
    assert "mask_rcnn with resnet18_fpn cannot be exported to onnx" in err and "operator frobnicate" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchscript_traced_for_cuda_runs_there(runs: dict[str, Path], tmp_path: Path) -> None:
    result = export(runs["mask"] / "last.pth", "torchscript", tmp_path / "cuda.pt", device="cuda", check_images=2)
    assert result.check.passed and result.device.startswith("cuda"), result.check.summary()
    model = torch.jit.load(str(tmp_path / "cuda.pt"), map_location="cuda")
    with torch.no_grad():
        boxes = model(torch.rand(3, 64, 64, device="cuda"))[0]
    assert boxes.is_cuda and boxes.shape[1] == 4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_traced_without_data_reproduces_the_model_on_real_images(
    runs: dict[str, Path], tmp_path: Path, fmt: str, monkeypatch
) -> None:
    """--check-images 0 reads no data (issue 22, item 19): the trace follows a synthetic image of model.min_size,
    and the file it gives matches the PyTorch model on the validation images as a checked export does."""
    from frcnn_train.data.decode import read_image
    from frcnn_train.export_check import as_float_image, check_export

    last = runs["mask"] / "last.pth"
    with monkeypatch.context() as patch:
        patch.setattr("frcnn_train.export_check.build_datasets", lambda *a, **k: pytest.fail("a dataset was read"))
        result = export(last, fmt, tmp_path / f"m.{fmt}", check_images=0)
    assert result.check is None and result.input_shape == [3, 64, 64]
    ckpt = checkpoint.load_checkpoint(last)
    model = load_model(ckpt, with_schema(ckpt["config"]), str(last))
    images = [as_float_image(read_image(p).image) for p in val_image_files(runs["mask"])[:2]]
    report = check_export(
        result.path,
        fmt,
        model,
        images,
        ("boxes", "labels", "scores", "masks"),
        input_size=[64, 64],
        device=torch.device("cpu"),
    )
    assert report.passed and report.reference > 0, report.summary()
