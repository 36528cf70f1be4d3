"""Every GPU figure in one command: run it first on a GPU machine, in at most 9 minutes (--budget 530 s).

On the GPU machine (Python 3.12, torch 2.11 / torchvision 0.26, no package registry), from the
repository root, with ./.whl filled beforehand on a machine that reaches PyPI by
`bash scripts/prepare_wheels.sh` (hydra-core, omegaconf, antlr4, pycocotools, onnx, onnxruntime,
protobuf, ml_dtypes, flatbuffers, faster-coco-eval; .whl is git-ignored, so the device run must carry it):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 scripts/gpu_check.py

It prints one table and writes it, section by section (a killed run keeps what it finished), to
$OUT/gpu_check.json when OUT is set, else outputs/gpu_check/ (with gpu_check.txt, profile.txt and
each section's output under sections/). Each section runs in processes of its own with its own
time limit, so one that fails or hangs loses only itself; the whole stops at --budget seconds
(later sections are then listed as skipped). Sections, most wanted first:

  environment      the versions the sections see (a wheel's protobuf that breaks TensorBoard is moved aside;
                   faster_coco_eval and matplotlib are optional: "missing" there fails nothing)
  bench_{faster,mask}_{e2e,compute}  scripts/benchmark.py --vs-torchvision, end to end and --compute-only
  train_100        a 100-step R50-FPN 800 px fp16 run of `python -m frcnn_train.train`: images/s, the
                   blocking ms of every save (train.log), finite losses, the AP it logged
  evaluate_fp32    that checkpoint through `python -m frcnn_train.evaluate ... trainer.amp=false`
  profile          torch.profiler of our CUDA step: the top ops (profile.txt)
  pytest_gpu       `pytest -m gpu` (tests/test_gpu.py and tests/test_export.py's GPU test; the benchmark's
                   test deselected: the bench_* sections ran it), each test's outcome in the JSON; among them the
                   v2 zoo presets against torchvision's builders at 800 px and frcnn_train.load(train_100's
                   checkpoint, device="cuda").predict equal to frcnn-predict; host syncs in sections/host_syncs.json
  zoo_v2_{faster,mask}  model=fasterrcnn_resnet50_fpn_v2 / maskrcnn_resnet50_fpn_v2 trained 27 fp16 steps at
                   800 px, batch 8, beside torchvision's own *_v2 builder (benchmark.py --vs-torchvision
                   --compute-only): images/s and peak memory per side, and finite losses, i.e. the v2 heads'
                   BatchNorm did not overflow in fp16
  deterministic    trainer.deterministic=true: a straight run to step 10 against one stopped at step 3 and
                   resumed, compared tensor by tensor; torch's warnings about nondeterministic ops; images/s
  roi_align        RoI pooling forward + backward: torchvision's kernel, torchvision deterministic, ours
  data_*           scripts/data_speed.py decode (nvjpeg) and loader (uint8 and --float)
  options          our compute-only images/s with bf16, channels_last, deterministic (A/B for issue 17 item 3)

`--device cpu` runs the same sections on a tiny config (tests/test_gpu_check.py); what needs CUDA is
skipped with its reason. `--sections a b` runs only those; `--quick` skips the slower CPU sections.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# The CPU stand-in for the R50-FPN at 800 px: 64 px images, a few of them, small heads (tests' tiny config).
TINY = [
    "data.shapes.num_train=8",
    "data.shapes.num_val=4",
    "data.shapes.image_size=64",
    "data.num_workers=0",
    "model.min_size=64",
    "model.max_size=64",
    "model.backbone.fpn_channels=32",
    "model.rpn_pre_nms_top_n_train=64",
    "model.rpn_post_nms_top_n_train=32",
    "model.rpn_pre_nms_top_n_test=32",
    "model.rpn_post_nms_top_n_test=16",
    "model.rpn_batch_size_per_image=32",
    "model.box_batch_size_per_image=16",
    "model.box_head_dim=32",
    "model.mask_head_dim=16",
    "model.mask_head_layers=1",
    "trainer.batch_size=2",
    "trainer.vis_images=1",
]
# torchvision's *_v2 builders fix the FPN and head widths: the v2 sections keep them on the CPU (R50 heads at 64 px).
V2_HEADS = ("model.backbone.fpn_channels", "model.box_head_dim", "model.mask_head_dim", "model.mask_head_layers")
SLOW_ON_CPU = (
    "bench_faster_e2e",
    "bench_mask_e2e",
    "bench_mask_compute",
    "deterministic",
    "data_loader_float",
    "zoo_v2_faster",
    "zoo_v2_mask",
)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.cuda = args.device.startswith("cuda")
        self.device, self.out, self.quick = args.device, args.out, args.quick
        self.work = args.work
        self.deadline = time.monotonic() + args.budget
        self.cache = self.work / "cache"
        (self.out / "sections").mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                dict.fromkeys([str(REPO)] + [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e])
            ),
        }

    def model(self, v2_heads: bool = False) -> list[str]:
        """The R50-FPN 800 px fp16 config of the CUDA benchmark, or the tiny one on the CPU (`v2_heads`: at
        torchvision's head widths)."""
        if not self.cuda:
            tiny = [o for o in TINY if not (v2_heads and o.startswith(V2_HEADS))]
            return [*tiny, f"data.cache_dir={self.cache}", "device=cpu"]
        sys.path.insert(0, str(REPO / "scripts"))
        from vs_torchvision import CUDA_DEFAULTS

        return [*CUDA_DEFAULTS, f"data.cache_dir={self.cache}", f"device={self.device}"]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        """argv in its own process group, killed whole at `timeout`; (exit code, output). 124: timed out."""
        timeout = max(1.0, min(timeout, self.left()))
        log = self.out / "sections" / f"{name}.log"
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = 124
            f.write(f"[exit {code}]\n")
        text = log.read_text(errors="replace")
        return code, text[text.rfind(f"$ {' '.join(argv)}") :]


def skip(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "note": reason}


def outcome(code: int, figures: dict[str, Any], note: str = "") -> dict[str, Any]:
    status = "ok" if code == 0 else "timeout" if code == 124 else "failed"
    return {"status": status, "figures": figures, "note": note}


def last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("[exit")]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or [""])[-1][:300]


# ---------------------------------------------------------------- sections
VERSIONS = (
    "import importlib, json\nout = {}\nfor name in ('torch', 'torchvision', 'numpy', 'tensorboard', "
    "'google.protobuf', 'onnx', 'onnxruntime', 'hydra', 'omegaconf', 'pycocotools', 'faster_coco_eval', "
    "'matplotlib'):\n"
    "    try:\n        module = importlib.import_module(name)\n"
    "        out[name] = getattr(module, '__version__', 'present')\n"
    "    except Exception as err:\n        out[name] = f'missing: {type(err).__name__}: {err}'[:160]\n"
    "try:\n    from torch.utils.tensorboard import SummaryWriter\n    out['tensorboard_writer'] = 'ok'\n"
    "except Exception as err:\n    out['tensorboard_writer'] = f'{type(err).__name__}: {err}'[:200]\n"
    "print(json.dumps(out))"
)


def environment(c: Check) -> dict[str, Any]:
    """Versions as the sections will see them. The wheels' protobuf (onnx needs >= 6.31) comes before the
    machine's on PYTHONPATH; if TensorBoard cannot import with it, it is moved aside (training needs
    TensorBoard, only the export test needs onnx) and the note says so."""

    def probe() -> dict[str, Any]:
        code, text = c.run("environment", [PY, "-c", VERSIONS], 60)
        line = next((line for line in text.splitlines() if line.startswith("{")), "{}")
        return json.loads(line)

    versions, note = probe(), ""
    if versions.get("tensorboard_writer") != "ok":
        for entry in c.env["PYTHONPATH"].split(os.pathsep):
            shadow = Path(entry) / "google" / "protobuf"
            if entry != str(REPO) and shadow.is_dir():
                shadow.rename(shadow.with_name("protobuf.aside"))
                note = f"TensorBoard failed with {shadow}; moved it aside (onnx may now fail)"
        versions = probe() if note else versions
    return {
        "status": "ok" if versions.get("tensorboard_writer") == "ok" else "failed",
        "figures": versions,
        "note": note,
    }


BENCH_STEPS = {"cuda": ("8", "3", "3"), "cpu": ("1", "2", "1")}  # --steps, --rounds, --warmup (one side)


def bench(c: Check, arch: str, compute: bool, name: str = "", timeout: float = 150) -> dict[str, Any]:
    name = name or f"bench_{arch.split('_')[0]}_{'compute' if compute else 'e2e'}"
    result = c.work / f"{name}.json"
    steps, rounds, warmup = BENCH_STEPS["cuda" if c.cuda else "cpu"]
    argv = [
        PY,
        "scripts/benchmark.py",
        "--vs-torchvision",
        "--device",
        c.device,
        "--steps",
        steps,
        "--rounds",
        rounds,
        "--warmup",
        warmup,
        "--json",
        str(result),
        *(["--compute-only"] if compute else []),
        f"model={arch}",
        *c.model(v2_heads=arch.endswith("_v2"))[:-1],
    ]
    code, text = c.run(name, argv, timeout)
    figures = json.loads(result.read_text()) if result.exists() else {}
    keep = ("ratio", "ratios", "images_per_s", "memory_mb", "blocking_ms", "plain_save_ms", "error", "amp")
    return outcome(code, {k: figures[k] for k in keep if k in figures}, "" if code == 0 else last_error(text))


def zoo_v2(c: Check, preset: str) -> dict[str, Any]:
    """The v2 preset's short fp16 training at real size (800 px, batch 8; CPU: fp32 at 64 px) beside torchvision's
    own *_v2 builder: the compute-only benchmark, whose sides train from the same weights (which also proves the
    layouts equal). A non-finite loss (the v2 heads' BatchNorm overflowing in fp16) ends it, naming the side."""
    result = bench(c, preset, True, name=f"zoo_v2_{preset.split('rcnn')[0]}", timeout=150 if c.cuda else 300)
    figures = result["figures"]
    steps, rounds, warmup = (int(v) for v in BENCH_STEPS["cuda" if c.cuda else "cpu"])
    error = str(figures.get("error", ""))
    finite = True if result["status"] == "ok" else False if "loss became" in error else None
    figures.update(losses_finite=finite, steps_per_side=warmup + steps * rounds)
    precision = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(figures.get("amp", ""), "fp32")
    if finite:
        result["note"] = f"{figures['steps_per_side']} {precision} steps a side, losses finite" + (
            ": the v2 heads' BatchNorm did not overflow" if precision == "fp16" else ""
        )
    elif error:
        result["note"] = error[:200]
    return result


STEP_LINE = re.compile(r"epoch \d+ step \d+/\d+  loss (\S+)  lr \S+  ([\d.]+) img/s")
SAVE_LINE = re.compile(r"Saved (\S+(?: \+ \S+)*) at step (\d+): blocked training (\d+) ms")


def train_log_figures(run_dir: Path) -> dict[str, Any]:
    text = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    steps = STEP_LINE.findall(text)
    losses = [float(loss) for loss, _ in steps]
    speeds = [float(speed) for _, speed in steps]
    saves = [{"files": files, "step": int(step), "blocking_ms": int(ms)} for files, step, ms in SAVE_LINE.findall(text)]
    figures: dict[str, Any] = {
        "images_per_s": statistics.median(speeds[1:] or speeds) if speeds else None,  # the first window warms up
        "images_per_s_windows": speeds,
        "losses_finite": all(v == v and abs(v) != float("inf") for v in losses),
        "last_loss": losses[-1] if losses else None,
        "saves": saves,
        "max_blocking_ms": max((s["blocking_ms"] for s in saves), default=None),
    }
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.read_text().strip():
        last = json.loads(metrics.read_text().strip().splitlines()[-1])
        figures["logged_ap"], figures["logged_ap50"] = last.get("bbox/AP"), last.get("bbox/AP50")
    return figures


def train_100(c: Check) -> dict[str, Any]:
    # CUDA: 400 images (the benchmark's) of batch 8, 2 epochs = 100 steps, evaluated at the end; CPU: 4 steps.
    size = ["trainer.epochs=2", "trainer.log_every=10"] if c.cuda else ["trainer.epochs=1", "trainer.log_every=2"]
    argv = [
        PY,
        "-m",
        "frcnn_train.train",
        *c.model(),
        *size,
        "trainer.eval_every=0",
        "trainer.progress=false",
        f"output_dir={c.work / 'runs'}",
        "run_name=train_100",
        "overwrite=true",
    ]
    code, text = c.run("train_100", argv, 150)
    return outcome(code, train_log_figures(c.work / "runs" / "train_100"), "" if code == 0 else last_error(text))


def evaluate_fp32(c: Check) -> dict[str, Any]:
    run_dir = c.work / "runs" / "train_100"
    if not (run_dir / "last.pth").exists():
        return skip("train_100 left no checkpoint")
    code, text = c.run(
        "evaluate_fp32",
        [PY, "-m", "frcnn_train.evaluate", str(run_dir / "last.pth"), "trainer.amp=false", "--json"],
        60,
    )
    line = next((line for line in text.splitlines() if line.startswith('{"metrics"')), None)
    metrics = json.loads(line)["metrics"] if line and code == 0 else {}
    logged = train_log_figures(run_dir).get("logged_ap")
    figures = {"ap_fp32": metrics.get("bbox/AP"), "ap50_fp32": metrics.get("bbox/AP50"), "ap_logged": logged}
    if figures["ap_fp32"] is not None and logged is not None:
        figures["same_as_logged"] = abs(figures["ap_fp32"] - logged) < 1e-9
    return outcome(code, figures, "" if code == 0 else last_error(text))


def pytest_gpu(c: Check) -> dict[str, Any]:
    if not c.cuda:
        return skip("needs CUDA (every test marked gpu skips without it)")
    # The benchmark's own GPU test runs what the bench_* sections ran already.
    # The API test predicts with train_100's checkpoint (the R50-FPN at 800 px) when there is one.
    argv = [
        PY,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfEsp",
        "tests",
        "--deselect",
        "tests/test_gpu.py::test_benchmark_vs_torchvision_on_cuda",
    ]
    trained = c.work / "runs" / "train_100" / "last.pth"
    env = {
        "FRCNN_GPU_REPORT": str(c.out / "sections"),
        **({"FRCNN_GPU_CHECKPOINT": str(trained)} if trained.exists() else {}),
    }
    code, text = c.run("pytest_gpu", argv, 260, env=env)
    closing = next((line for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", closing)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    tests = {name: state for state, name in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", text, re.M)}
    figures = {**counts, "failed_tests": failed, "tests": tests}
    return outcome(code, figures, "" if code == 0 else f"{len(failed)} failed")


def deterministic(c: Check) -> dict[str, Any]:
    """A straight run against one stopped mid-epoch and resumed, with trainer.deterministic=true."""
    # Both end at step 10 (CUDA: 100 steps per epoch of batch 4; CPU: 4 per epoch, an epoch end on the way).
    size = ["trainer.batch_size=4", "trainer.log_every=2"] if c.cuda else ["trainer.epochs=4", "trainer.log_every=2"]
    base = [
        PY,
        "-m",
        "frcnn_train.train",
        *c.model(),
        *size,
        "trainer.deterministic=true",
        "trainer.eval_every=0",
        "trainer.progress=false",
        f"output_dir={c.work / 'runs'}",
        "overwrite=true",
    ]
    runs = c.work / "runs"
    texts, codes = [], []
    for argv in (
        [*base, "run_name=det_straight", "trainer.max_steps=10"],
        [*base, "run_name=det_stopped", "trainer.max_steps=3"],
        [PY, "-m", "frcnn_train.train", f"resume={runs / 'det_stopped'}", "trainer.max_steps=10"],
    ):
        code, text = c.run("deterministic", argv, 90)
        codes.append(code)
        texts.append(text)
        if code:
            return outcome(code, {}, last_error(text))
    result = c.work / "deterministic.json"
    code, text = c.run(
        "deterministic",
        [
            PY,
            "scripts/gpu_probes.py",
            "compare",
            str(runs / "det_straight" / "last.pth"),
            str(runs / "det_stopped" / "last.pth"),
            "--json",
            str(result),
        ],
        60,
    )
    compared = json.loads(result.read_text()) if result.exists() else {}
    warned = sorted(
        {
            line.strip()[:240]
            for t in texts
            for line in t.splitlines()
            if "deterministic" in line and ("Warning" in line or "warn" in line)
        }
    )
    figures = {
        **compared,
        "nondeterministic_op_warnings": warned,
        "images_per_s": train_log_figures(runs / "det_straight")["images_per_s"],
    }
    if code == 0 and not compared.get("bitwise_equal"):
        return {"status": "failed", "figures": figures, "note": "the resumed run differs from the straight one"}
    return outcome(code, figures, "" if code == 0 else last_error(text))


def profile(c: Check) -> dict[str, Any]:
    result = c.work / "profile.json"
    argv = [
        PY,
        "scripts/gpu_probes.py",
        "profile",
        "--device",
        c.device,
        "--out",
        str(c.out / "profile.txt"),
        "--json",
        str(result),
        *(["--steps", "2", "--warmup", "1"] if not c.cuda else []),
        *c.model()[:-1],
    ]
    code, text = c.run("profile", argv, 90)
    figures = json.loads(result.read_text()) if result.exists() else {}
    if "top" in figures:
        figures["top"] = figures["top"][:8]
    return outcome(code, figures, "" if code == 0 else last_error(text))


def roi_align(c: Check) -> dict[str, Any]:
    result = c.work / "roi_align.json"
    code, text = c.run(
        "roi_align",
        [
            PY,
            "scripts/gpu_probes.py",
            "roi_align",
            "--device",
            c.device,
            "--json",
            str(result),
            *([] if c.cuda else ["--repeats", "1"]),
        ],
        90,
    )
    return outcome(
        code, json.loads(result.read_text()) if result.exists() else {}, "" if code == 0 else last_error(text)
    )


def data_speed(c: Check, what: str, *extra: str) -> dict[str, Any]:
    name = {"decode": "data_decode", "loader": "data_loader_float" if "--float" in extra else "data_loader"}[what]
    if what == "decode":
        args = ["--device", c.device, "--count", "64"] if c.cuda else ["--count", "4", "--repeats", "1"]
    else:
        args = (
            ["--workers", "8", "--size", "640", "--pin", "--count", "256", "--epochs", "3"]
            if c.cuda
            else ["--workers", "1", "--size", "64", "--count", "8", "--epochs", "2", "--batch", "2"]
        )
    argv = [PY, "scripts/data_speed.py", what, *args, *extra, "--cache", str(c.work / "data_speed")]
    code, text = c.run(name, argv, 90)
    rows = [line.rstrip() for line in text.splitlines()[1:] if line.strip() and not line.startswith("[exit")]
    return outcome(code, {"output": rows[-6:]}, "" if code == 0 else last_error(text))


OPTIONS = {
    "default (fp16)": [],
    "bf16": ["trainer.amp_dtype=bf16"],
    "channels_last": ["trainer.channels_last=true"],
    "channels_last + bf16": ["trainer.channels_last=true", "trainer.amp_dtype=bf16"],
    "deterministic": ["trainer.deterministic=true"],
}


def options(c: Check) -> dict[str, Any]:
    if not c.cuda:
        return skip("CUDA only: speed options on the CPU are in docs/gpu-and-speed.md")
    figures: dict[str, Any] = {}
    code = 0
    for i, (name, extra) in enumerate(OPTIONS.items()):
        if c.left() < 30:
            figures[name] = "skipped: overall budget spent"
            continue
        result = c.work / f"option_{i}.json"
        argv = [
            PY,
            "scripts/benchmark.py",
            "--vs-torchvision",
            "--compute-only",
            "--sides",
            "frcnn_train",
            "--device",
            c.device,
            "--steps",
            "8",
            "--rounds",
            "2",
            "--warmup",
            "3",
            "--json",
            str(result),
            *c.model()[:-1],
            *extra,
        ]
        one, text = c.run("options", argv, 70)
        code = code or one
        figures[name] = (
            json.loads(result.read_text()).get("images_per_s", {}).get("frcnn_train")
            if result.exists() and one == 0
            else last_error(text)
        )
    return outcome(code, figures)


SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "environment": environment,
    "bench_faster_e2e": lambda c: bench(c, "faster_rcnn", False),
    "bench_faster_compute": lambda c: bench(c, "faster_rcnn", True),
    "train_100": train_100,
    "evaluate_fp32": evaluate_fp32,
    "bench_mask_e2e": lambda c: bench(c, "mask_rcnn", False),
    "bench_mask_compute": lambda c: bench(c, "mask_rcnn", True),
    "profile": profile,
    "pytest_gpu": pytest_gpu,
    "zoo_v2_faster": lambda c: zoo_v2(c, "fasterrcnn_resnet50_fpn_v2"),
    "zoo_v2_mask": lambda c: zoo_v2(c, "maskrcnn_resnet50_fpn_v2"),
    "deterministic": deterministic,
    "roi_align": roi_align,
    "data_decode": lambda c: data_speed(c, "decode"),
    "data_loader": lambda c: data_speed(c, "loader"),
    "data_loader_float": lambda c: data_speed(c, "loader", "--float"),
    "options": options,
}


# ---------------------------------------------------------------- the table
def summary(figures: dict[str, Any]) -> str:
    """A short line of a section's figures for the table (the JSON has them all)."""
    if "torch" in figures:  # the environment
        return " ".join(f"{k.split('.')[-1]} {str(v).split()[0]}" for k, v in figures.items())[:150]
    parts = []
    for key in (
        "ratio",
        "images_per_s",
        "logged_ap",
        "ap_fp32",
        "same_as_logged",
        "max_blocking_ms",
        "passed",
        "failed",
        "bitwise_equal",
        "differing",
        "step_ms",
        "losses_finite",
        "memory_mb",
    ):
        if key in figures and figures[key] is not None:
            value = figures[key]
            if isinstance(value, dict):
                value = " ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            elif isinstance(value, float):
                value = f"{value:.3g}"
            parts.append(f"{key} {value}")
    return "; ".join(parts)[:150]


def write(c: Check, record: dict[str, Any]) -> str:
    rows = [f"{'section':<22}{'status':<9}{'s':>6}  figures / note"]
    for name, r in record["sections"].items():
        text = summary(r.get("figures", {})) or ""
        if r.get("note"):
            text = f"{text} ({r['note']})" if text else r["note"]
        rows.append(f"{name:<22}{r['status']:<9}{r.get('seconds', 0):>6.0f}  {text}")
    table = "\n".join(rows)
    (c.out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
    (c.out / "gpu_check.txt").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu (a tiny config)")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else outputs/gpu_check")
    parser.add_argument("--work", type=Path, default=None, help="data, runs and caches (default: /tmp/frcnn_gpu_check)")
    parser.add_argument("--budget", type=float, default=530, help="seconds for everything (sections after it skip)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help=f"skip the slower CPU sections: {', '.join(SLOW_ON_CPU)}")
    args = parser.parse_args(argv)
    import torch  # after argparse: --help stays fast

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = args.out or Path(os.environ.get("OUT") or REPO / "outputs" / "gpu_check")
    args.work = args.work or Path("/tmp/frcnn_gpu_check")
    args.work.mkdir(parents=True, exist_ok=True)
    c = Check(args)
    gpu = torch.cuda.get_device_name(0) if c.cuda else "none"
    record: dict[str, Any] = {
        "device": args.device,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "budget_s": args.budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sections": {},
    }
    print(f"gpu_check on {args.device} ({gpu}), torch {torch.__version__}; results in {c.out}", flush=True)
    for name in SECTIONS:
        if name not in args.sections:
            continue
        started = time.monotonic()
        if args.quick and not c.cuda and name in SLOW_ON_CPU:
            result = skip("--quick on the CPU")
        elif c.left() < 20:
            result = skip("overall budget spent")
        else:
            try:
                result = SECTIONS[name](c)
            except Exception as err:  # a broken section must not lose the others
                result = {"status": "failed", "note": f"{type(err).__name__}: {err}"[:300]}
        result["seconds"] = round(time.monotonic() - started, 1)
        record["sections"][name] = result
        write(c, record)
        print(f"  {name:<22}{result['status']:<9}{result['seconds']:>6.0f} s", flush=True)
    print(write(c, record))
    return 0 if all(r["status"] in ("ok", "skipped") for r in record["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
