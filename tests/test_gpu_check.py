"""scripts/gpu_check.py on the CPU (a tiny config): one table, the same as JSON, every section ran or was
skipped with its reason; a failing section loses only itself; the overall budget stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import python_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_check.py",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return result, record


def _assert_table(result: subprocess.CompletedProcess, record: dict) -> None:
    assert list(record["sections"]) == list(gpu_check.SECTIONS)
    for name, section in record["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        assert section["status"] == "ok" or section["note"], f"{name} skipped without a reason"
    table = (Path(record_out(result)) / "gpu_check.txt").read_text().splitlines()
    assert table[0].startswith("section") and [row.split()[0] for row in table[1:]] == list(gpu_check.SECTIONS)
    assert result.stdout.strip().endswith(table[-1])
    sections = record["sections"]
    assert sections["pytest_gpu"]["status"] == "skipped" and "CUDA" in sections["pytest_gpu"]["note"]
    train = sections["train_100"]["figures"]
    assert train["losses_finite"] and train["saves"] and train["images_per_s"] > 0 and "logged_ap" in train
    assert sections["evaluate_fp32"]["figures"]["same_as_logged"] is True
    assert sections["bench_faster_compute"]["figures"]["ratio"] > 0
    assert "matmul (ours, deterministic)" in " ".join(sections["roi_align"]["figures"])
    assert sections["profile"]["figures"]["top"] and sections["data_loader"]["figures"]["output"]


def record_out(result: subprocess.CompletedProcess) -> str:
    return result.stdout.splitlines()[0].rsplit("results in ", 1)[1]


def test_on_the_cpu_every_section_runs_or_says_why_not(tmp_path: Path) -> None:
    """--quick: about a minute of CPU (the sections that take longest on the CPU skip, saying so)."""
    result, record = _check(tmp_path, "--quick")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_table(result, record)
    for name in ("deterministic", "zoo_v2_faster", "zoo_v2_mask"):
        assert record["sections"][name]["note"] == "--quick on the CPU"
    assert (tmp_path / "out" / "profile.txt").read_text().count("aten::") > 5


@pytest.mark.slow  # every section the CPU can run, both benchmark modes of both models included: minutes
def test_every_cpu_section_runs(tmp_path: Path) -> None:
    result, record = _check(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_table(result, record)
    sections = record["sections"]
    assert [n for n, s in sections.items() if s["status"] == "skipped"] == ["pytest_gpu", "options"]
    assert sections["deterministic"]["figures"]["bitwise_equal"] is True
    assert sections["deterministic"]["figures"]["tensors"] > 100
    for name in ("bench_faster_e2e", "bench_mask_e2e", "bench_mask_compute", "zoo_v2_faster", "zoo_v2_mask"):
        assert sections[name]["figures"]["ratio"] > 0
    for name in ("zoo_v2_faster", "zoo_v2_mask"):  # the v2 presets trained beside torchvision's *_v2 builders
        figures = sections[name]["figures"]
        assert figures["losses_finite"] is True and figures["steps_per_side"] == 3, figures
        assert set(figures["images_per_s"]) == {"torchvision", "frcnn_train"}, figures


def test_a_failing_section_loses_only_itself_and_the_budget_stops_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(c):
        raise RuntimeError("this section broke")

    ran = []
    fake = {
        name: (lambda c, name=name: ran.append(name) or {"status": "ok", "figures": {"n": 1}})
        for name in gpu_check.SECTIONS
    }
    fake["train_100"] = broken
    monkeypatch.setattr(gpu_check, "SECTIONS", fake)
    out = tmp_path / "out"
    code = gpu_check.main(["--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work")])
    record = json.loads((out / "gpu_check.json").read_text())
    assert code == 1 and record["sections"]["train_100"] == {
        "status": "failed",
        "seconds": record["sections"]["train_100"]["seconds"],
        "note": "RuntimeError: this section broke",
    }
    assert ran == [name for name in fake if name != "train_100"]
    code = gpu_check.main(["--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work"), "--budget", "5"])
    record = json.loads((out / "gpu_check.json").read_text())
    assert code == 0 and {s["note"] for s in record["sections"].values()} == {"overall budget spent"}


def test_a_v2_preset_whose_fp16_loss_overflows_is_a_failure_naming_the_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zoo_v2_*: the benchmark's exit 2 with its JSON error (a non-finite loss) reads as losses_finite False."""

    def benchmark_ended(c, name, argv, timeout, env=None):
        error = "frcnn_train side: the loss became non-finite at step 4 (epoch 1: loss_classifier=nan)"
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"amp": "torch.float16", "error": error}))
        return 2, f"error: {error}"

    monkeypatch.setattr(gpu_check.Check, "run", benchmark_ended)
    args = gpu_check.argparse.Namespace(device="cpu", out=tmp_path / "out", quick=False, work=tmp_path, budget=60)
    result = gpu_check.zoo_v2(gpu_check.Check(args), "maskrcnn_resnet50_fpn_v2")
    assert result["status"] == "failed" and result["figures"]["losses_finite"] is False
    assert result["note"].startswith("frcnn_train side: the loss became non-finite at step 4")
