"""`frcnn-train` as a process: exit codes, Ctrl-C in start-up, Hydra multirun and sweeps."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides


def _has_optuna_sweeper() -> bool:
    # find_spec of a submodule raises when the parent package (hydra_plugins) is missing too.
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:
        return False


def tiny(shapes_cache: Path) -> list[str]:
    """Four training images, two steps and an evaluation per epoch: a job in a few seconds."""
    return tiny_overrides(shapes_cache, Path("outputs")) + ["data.shapes.num_train=4", "data.shapes.num_val=2"]


def train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "frcnn_train.train", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_multirun_gives_each_job_a_run_directory_and_survives_a_failing_job(shapes_cache: Path, tmp_path: Path) -> None:
    args = [a for a in tiny(shapes_cache) if not a.startswith("run_name=")]
    proc = train(tmp_path, "-m", *args, "init_from=/nonexistent/w.pth,null", "seed=1,2")
    assert proc.returncode == 2, "a job failed with a user error: " + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("init_from=/nonexistent/w.pth does not exist" in e for e in errors), proc.stderr
    assert errors[0].startswith("error: job 0 (") and errors[1].startswith("error: job 1 (")

    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    jobs = _jobs(sweep)
    assert [j["status"] for j in jobs] == ["user error", "user error", "finished", "finished"]
    assert [j["best_metric"] for j in jobs[:2]] == [None, None], "no metric is null (README), not NaN"
    run_dirs = [tmp_path / j["run_dir"] for j in jobs[2:]]
    # The sweep's jobs started within one second of each other: the job number keeps them apart.
    assert run_dirs[0] != run_dirs[1] and all((d / "last.pth").is_file() for d in run_dirs)
    assert [d.name[-2:] for d in run_dirs] == ["_2", "_3"]
    assert all(isinstance(j["best_metric"], float) for j in jobs[2:]), "main returns trainer.best_metric"
    assert (sweep / "multirun.yaml").is_file()
    assert not (tmp_path / "multirun").exists()
    empty = [p for p in (tmp_path / "outputs").rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert not empty, f"empty directories left behind: {empty}"


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_optuna_sweeper(), reason="hydra-optuna-sweeper not installed (pip install frcnn_train[sweep])"
)
def test_optuna_sweep_over_the_learning_rate(shapes_cache: Path, tmp_path: Path) -> None:
    args = [a for a in tiny(shapes_cache) if not a.startswith(("run_name=", "optim.lr="))]
    proc = train(
        tmp_path,
        "-m",
        *args,
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.direction=maximize",
        "optim.lr=interval(0.001,0.02)",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.001 <= results["best_params"]["optim.lr"] <= 0.02 and isinstance(results["best_value"], float)
    assert len((sweep / "jobs.jsonl").read_text().splitlines()) == 2


def _jobs(sweep: Path) -> list[dict]:
    """jobs.jsonl as strict JSON: a bare NaN (which Python's json writes and reads by default) fails."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in jobs.jsonl is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (sweep / "jobs.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_optuna_sweeper(), reason="hydra-optuna-sweeper not installed (pip install frcnn_train[sweep])"
)
def test_optuna_sweep_goes_on_past_failed_and_unevaluated_trials(shapes_cache: Path, tmp_path: Path) -> None:
    """A refused LR (a user error) and a run stopped before its evaluation reach Optuna as failed trials;
    the study goes on, writes its result from the trial that evaluated, and the sweep exits 2 (a job failed)."""
    args = [a for a in tiny(shapes_cache) if not a.startswith(("run_name=", "optim.lr="))]
    proc = train(
        tmp_path,
        "-m",
        *args,
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.direction=maximize",
        "optim.lr=choice(0.01,-1)",
        "trainer.max_steps=choice(1,4)",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optim.lr": 0.01, "trainer.max_steps": 4}, results
    jobs = sorted(_jobs(sweep), key=lambda j: j["overrides"][:2])
    assert [(j["status"], j["best_metric"] is None) for j in jobs] == [
        ("user error", True),
        ("user error", True),
        ("finished", True),
        ("finished", False),
    ], jobs
    assert "no bbox/AP: the run never evaluated it (a failed trial for a sweeper)" in proc.stderr


@pytest.mark.skipif(
    not _has_optuna_sweeper(), reason="hydra-optuna-sweeper not installed (pip install frcnn_train[sweep])"
)
def test_optuna_sweep_whose_every_trial_failed_ends_in_one_line(shapes_cache: Path, tmp_path: Path) -> None:
    """Optuna has no best trial to report: one line says why, exit 2; each job said its own error first."""
    args = [a for a in tiny(shapes_cache) if not a.startswith(("run_name=", "optim.lr="))]
    proc = train(tmp_path, "-m", *args, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "optim.lr=interval(-2,-1)")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all("optim.lr=-1." in e for e in errors[:2]), proc.stderr
    assert errors[2].startswith("error: no job of the sweep returned bbox/AP (each failed or never evaluated; see ")
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    assert not (sweep / "optimization_results.yaml").exists() and len(_jobs(sweep)) == 2


def _started(proc: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError("".join(lines))


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_ctrl_c_in_start_up_is_one_line_and_exit_130(shapes_cache: Path, tmp_path: Path) -> None:
    """Ctrl-C while the dataset is being generated, long before the training loop: nothing trained, nothing left."""
    env, base = ENV, tiny(shapes_cache)
    cache = tmp_path / "fresh_cache"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "frcnn_train.train",
            *base,
            f"data.cache_dir={cache}",
            "data.shapes.num_train=5000",
            "trainer.max_steps=1",
            "run_name=early",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not list(cache.glob("shapes/.tmp-*/train/*.png")):  # generation has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert err.strip() == "interrupted during start-up: nothing was trained"
    early = tmp_path / "outputs" / "early"
    assert not (early / "last.pth").exists() and not (early / ".lock").exists(), "the run directory is released"
    assert not list((cache / "shapes").iterdir()), "the half-generated dataset is removed"


def test_ctrl_c_that_c_code_turns_into_another_error_still_reads_as_ctrl_c(shapes_cache: Path, tmp_path: Path) -> None:
    """NumPy's __array__ fallback can swallow the KeyboardInterrupt and raise a TypeError in its place (seen in CI)."""
    swallow = (
        "import os, signal, sys, time\n"
        "import frcnn_train.launch, frcnn_train.train as t\n"
        "def run(cfg, overrides, **kwargs):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "    except KeyboardInterrupt:\n"
        "        pass\n"
        "    raise TypeError(\"__array__() got an unexpected keyword argument 'copy'\")\n"
        "frcnn_train.launch.run = run\n"
        "sys.argv[0] = 'frcnn-train'\n"
        "t.cli()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", swallow, *tiny(shapes_cache)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr.strip()) == (130, "interrupted during start-up: nothing was trained")


def test_exit_codes_finished_0_stopped_by_sigterm_143(shapes_cache: Path, tmp_path: Path) -> None:
    env, base = ENV, tiny(shapes_cache)
    # SIGTERM in the loop: last.pth saved, resumable, exit 128 + 15.
    proc = subprocess.Popen(
        [sys.executable, "-m", "frcnn_train.train", *base, "run_name=stopped", "trainer.epochs=4"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    _started(proc, "step 1/2")
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 143, out
    assert "received SIGTERM" in out and (tmp_path / "outputs" / "stopped" / "last.pth").is_file()

    finished = train(tmp_path, *base, "run_name=done")
    assert finished.returncode == 0, finished.stderr


def test_a_stop_signal_ends_the_whole_sweep(shapes_cache: Path, tmp_path: Path) -> None:
    args = [a for a in tiny(shapes_cache) if not a.startswith("run_name=")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "frcnn_train.train", "-m", *args, "trainer.epochs=4", "seed=1,2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    _started(proc, "step 1/2")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    assert "sweep stopped at job 0: received SIGTERM" in err and "Traceback" not in out + err
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    (job,) = [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]
    assert job["status"] == "stopped (received SIGTERM)" and (tmp_path / job["run_dir"] / "last.pth").is_file()
