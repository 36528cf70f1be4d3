"""torchrun with CPU processes (gloo): stop, signals, restarts after kill -9, other world sizes, several nodes.

Each torchrun here trains the tiny config (8 images, batch 1, 2 epochs: 4 steps per epoch on 2 processes).
The long variants are marked slow: `python -m pytest -m slow tests/test_distributed.py`.

Every rank runs with WORKER_THREADS intra-op threads (set explicitly: torchrun sets OMP_NUM_THREADS=1 only when
the variable is unset), and every comparison of a torchrun run with one in this process runs this side with the
same count (conftest.torch_threads): another count sums floats in another order.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import WORKER_THREADS, threads_env, tiny_overrides, torch_threads
from frcnn_train import checkpoint, distributed
from frcnn_train.config import compose_config
from frcnn_train.launch import run

EPOCHS = ["trainer.epochs=2", "trainer.batch_size=1"]
STEPS = 8  # 2 epochs x 8 images / (2 processes x batch 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args: str, nproc: int = 2, launcher: tuple[str, ...] = ()) -> list[str]:
    launcher = launcher or (f"--nproc_per_node={nproc}", f"--master-port={free_port()}")
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "frcnn_train.train", *args]


def start(cmd: list[str], env: dict[str, str] | None = None, *, own_group: bool = False) -> subprocess.Popen:
    """torchrun in the background; `own_group`: in a process group of its own, as a terminal's foreground job."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **threads_env(WORKER_THREADS), **(env or {})},
        start_new_session=own_group,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{out[-4000:]}") from None
    return out


def torchrun(*args: str, nproc: int = 2, rc: int = 0) -> str:
    proc = start(torchrun_cmd(*args, nproc=nproc))
    out = finish(proc)
    assert proc.returncode == rc, out[-4000:]
    return out


def workers(proc: subprocess.Popen) -> list[int]:
    """The rank processes torchrun started (its children)."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def saved_step(path: Path) -> int:
    """The global step of the checkpoint at `path`, -1 when there is none yet (atomic writes: never half a file)."""
    try:
        return checkpoint.load_checkpoint(path)["trainer"]["global_step"]
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while (found := saved_step(path)) < step:
        assert proc.poll() is None, f"torchrun ended before step {step}:\n{finish(proc)[-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint at step {step} after {timeout} s"
        time.sleep(0.2)
    return found


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["trainer"]["global_step"] == b["trainer"]["global_step"]
    for key, tensor in b["model"].items():
        assert torch.equal(tensor, a["model"][key]), key
    for (ka, va), vb in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        for name in va:
            assert torch.equal(va[name], vb[name]), f"optimizer state {ka}.{name}"
    assert a["trainer"]["last_metrics"] == b["trainer"]["last_metrics"]


@pytest.fixture(scope="module")
def base(shapes_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    # No run_name=: each test names its runs, and a resume continues in the checkpoint's own directory (a
    # different run_name is refused there).
    tiny = tiny_overrides(shapes_cache, tmp_path_factory.mktemp("dist"))
    return [a for a in tiny if not a.startswith("run_name=")] + EPOCHS


@pytest.fixture(scope="module")
def reference(base: list[str]) -> dict:
    """An uninterrupted 2-process run, shared by the tests of this module."""
    torchrun(*base, "run_name=reference")
    return checkpoint.load_checkpoint(Path(_output_dir(base)) / "reference" / "last.pth")


def _output_dir(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))


def test_torchrun_stop_and_resume_matches_an_uninterrupted_run(base: list[str], reference: dict) -> None:
    out = torchrun(*base, "run_name=stopped", "trainer.max_steps=3")
    assert out.count("step 3/4") == 1, "only rank 0 prints progress"
    assert "torchrun --nproc_per_node=2 -m frcnn_train.train resume=" in out
    torchrun(*base, f"resume={_output_dir(base)}/stopped", "trainer.max_steps=null")
    resumed = checkpoint.load_checkpoint(Path(_output_dir(base)) / "stopped" / "last.pth")
    assert resumed["trainer"]["global_step"] == STEPS and len(resumed["rng"]["ranks"]) == 2
    assert resumed["trainer"]["world_size"] == 2
    assert_bitwise_equal(resumed, reference)


def test_ap_logged_by_a_ddp_run_is_what_evaluate_reports_on_its_checkpoint(base: list[str], reference: dict) -> None:
    """Each rank evaluates its shard of whole batches with rank 0's BatchNorm statistics, which the checkpoint
    holds; rank 0 alone scores. (The tiny run's AP is 0; test_ddp_evaluation_... checks the detections.)"""
    from frcnn_train.evaluate import run_evaluation

    with torch_threads(WORKER_THREADS):  # exact: the ranks' thread count
        metrics, _, _ = run_evaluation(Path(_output_dir(base)) / "reference" / "last.pth")
    assert metrics == reference["trainer"]["last_metrics"]


def test_ddp_evaluation_gives_one_process_detections_to_rank_0_and_the_metrics_to_all(
    shapes_cache: Path, tmp_path: Path
) -> None:
    """Shards of whole batches, rank 0's BatchNorm statistics, detections gathered on rank 0 only: exactly the
    detections (and so the AP) of one process; every rank gets the metrics. Untrained weights, so no AP of 0."""
    import json

    from frcnn_train.data import build_datasets, build_eval_loader
    from frcnn_train.evaluation import evaluate
    from frcnn_train.models import build_model

    overrides = tiny_overrides(shapes_cache, tmp_path) + ["model.box_score_thresh=0.0", "trainer.batch_size=1"]
    worker = Path(__file__).parent / "distributed_eval_worker.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master-port={free_port()}",
        str(worker),
        str(tmp_path),
        *overrides,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **threads_env(WORKER_THREADS)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    cfg = compose_config(overrides)
    data = build_datasets(cfg.data, with_masks=False)
    cfg.model.num_classes = len(data.classes)
    torch.manual_seed(0)
    model = build_model(cfg.model, read_backbone_weights=False)
    with torch_threads(WORKER_THREADS):  # exactly equal detections need the ranks' thread count here too
        metrics, results = evaluate(
            model,
            build_eval_loader(data.val, batch_size=1, num_workers=0),
            coco_gt=data.val.coco,
            label_to_cat_id=data.val.label_to_cat_id,
            device=torch.device("cpu"),
            with_masks=False,
        )
    assert len(results) > 10 and {r["image_id"] for r in results} == set(data.val.image_ids)
    assert ranks[0]["results"] == json.loads(json.dumps(results)) and ranks[1]["results"] == []
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == metrics


# ------------------------------------------------------------------ signals
SIGNALS = {
    "ctrl-c on torchrun": lambda proc: os.kill(proc.pid, signal.SIGINT),
    # What a terminal does: SIGINT to its foreground process group, torchrun and every rank at once.
    "ctrl-c in the terminal of torchrun": lambda proc: os.killpg(proc.pid, signal.SIGINT),
    "kill -TERM torchrun": lambda proc: os.kill(proc.pid, signal.SIGTERM),
    "SIGTERM to every rank (SLURM)": lambda proc: [os.kill(pid, signal.SIGTERM) for pid in workers(proc)],
    "SIGTERM to rank 1 only": lambda proc: os.kill(workers(proc)[1], signal.SIGTERM),
}


@pytest.mark.parametrize(
    "how",
    [
        "ctrl-c on torchrun",
        pytest.param("ctrl-c in the terminal of torchrun", marks=pytest.mark.slow),
        pytest.param("kill -TERM torchrun", marks=pytest.mark.slow),
        pytest.param("SIGTERM to every rank (SLURM)", marks=pytest.mark.slow),
        pytest.param("SIGTERM to rank 1 only", marks=pytest.mark.slow),  # the others learn it at the same step
    ],
)
def test_a_signal_stops_every_rank_at_one_step_and_saves_once(base: list[str], tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "sig"
    args = [
        *base,
        f"output_dir={tmp_path}",
        "run_name=sig",
        "trainer.epochs=50",
        "trainer.eval_every=0",
        "trainer.keep_last=0",
    ]
    proc = start(torchrun_cmd(*args), own_group="terminal" in how)
    wait_for_step(run_dir / "last.pth", 4, proc)  # the end of epoch 1
    SIGNALS[how](proc)
    sent = time.monotonic()
    out = finish(proc, timeout=60)
    took = time.monotonic() - sent
    assert took < 15, f"{took:.0f} s after the signal; torchrun kills the ranks after 30 s"
    assert "forcefully exiting" not in out and "KeyboardInterrupt" not in out and "Error executing job" not in out, out
    # Ranks exit 0; torchrun itself reports the signal it got, unless only the ranks were signalled: with a
    # traceback of its own (README "Stopping" says so), printed after the run saved and said how to resume.
    assert proc.returncode == (1 if "torchrun" in how else 0), out[-3000:]
    assert ("SignalException: Process" in out) == ("torchrun" in how), out[-3000:]
    assert "torchrun" not in how or out.index("Resume with:") < out.index("Traceback"), out[-3000:]
    assert out.count("Stopped at step") == 1, out[-3000:]
    stopped = checkpoint.load_checkpoint(run_dir / "last.pth")
    step = stopped["trainer"]["global_step"]
    assert re.search(rf"Stopped at step {step} \([^)]*\) \((received SIG|another process)", out), out[-3000:]
    assert "Resume with:   torchrun --nproc_per_node=2 -m frcnn_train.train resume=" in out
    assert step > 4 and [p.name for p in run_dir.glob("*.pth")] == ["last.pth"]
    assert not list(run_dir.glob(".*tmp*")), "no temporary file left"


def test_a_signal_during_an_epochs_last_step_stops_there_and_the_resume_ends_the_epoch(
    compose_tiny, monkeypatch
) -> None:
    """The stop is agreed after every step, the epoch's last included (it used to be skipped there, so a rank
    signalled then went on while the others stopped). The resume runs the empty rest and the epoch's end."""
    from frcnn_train.trainer import Trainer

    train_step = Trainer.train_step

    def signal_in_last_step(self, *args, **kwargs):
        losses = train_step(self, *args, **kwargs)
        if self.counters.global_step == 4:  # the last of epoch 1's 4 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    monkeypatch.setattr(Trainer, "train_step", signal_in_last_step)
    stopped = run(compose_tiny("trainer.epochs=2", "run_name=last_step"))
    state = checkpoint.load_checkpoint(Path(stopped["run_dir"]) / "last.pth")["trainer"]
    assert (stopped["stop_reason"], state["global_step"], state["epoch"], state["step_in_epoch"]) == (
        "received SIGTERM",
        4,
        0,
        4,
    )
    monkeypatch.setattr(Trainer, "train_step", train_step)
    resumed = run(compose_tiny("trainer.epochs=2", f"resume={stopped['run_dir']}"))
    assert resumed["completed"] and resumed["global_step"] == 8
    assert (Path(stopped["run_dir"]) / "epoch_0001.pth").exists()


def test_the_first_signal_stops_a_repeat_within_the_debounce_is_the_same_one_a_later_one_aborts() -> None:
    with distributed.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the terminal's Ctrl-C: same request
        assert stop.reason == "received SIGTERM"
        time.sleep(distributed.SIGNAL_DEBOUNCE_S + 0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------ torchrun restarts
def _running(pid: int) -> bool:
    """Alive and not yet a zombie: a SIGKILL to it takes effect (to a zombie it does nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_a_rank(proc: subprocess.Popen, rng: random.Random) -> int:
    """kill -9 one of the ranks that are running now; returns its pid. Between two groups there may be none
    for a moment, and ranks the agent is stopping may already be zombies, which a kill would not touch."""
    for _ in range(100):
        running = [pid for pid in workers(proc) if _running(pid)]
        if running:
            try:
                pid = rng.choice(running)
                os.kill(pid, signal.SIGKILL)
                return pid
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError("no rank to kill")


def kill_ranks(base: list[str], tmp_path: Path, kills: int) -> tuple[dict, str]:
    """Train with torchrun's restarts and resume=auto, killing (-9) a random rank at `kills` random steps."""
    rng = random.Random(kills)
    args = [*base, f"output_dir={tmp_path}", "run_name=restarts", "resume=auto", "trainer.checkpoint_every_steps=1"]
    proc = start(
        torchrun_cmd(*args, launcher=("--nproc_per_node=2", f"--master-port={free_port()}", f"--max-restarts={kills}"))
    )
    last = tmp_path / "restarts" / "last.pth"
    # A step may already be behind the run when its turn comes: that kill then hits a restarted group
    # during its start-up, a fault as good as any.
    killed = []
    for step in sorted(rng.sample(range(1, STEPS - 1), kills)):
        wait_for_step(last, step, proc)
        time.sleep(rng.uniform(0, 0.5))
        killed.append(kill_a_rank(proc, rng))
        time.sleep(1)  # until the agent has stopped the group
    out = finish(proc, timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "connectFullMesh" not in out, out[-4000:]
    # Each kill hit a running rank, so each took effect. torchrun's "(exitcode: -9)" lines do not count them:
    # a kill that lands while the agent stops or restarts a group is part of that failure, and a rank the
    # agent finds dead in the same poll may be reported first with its own code (1, the lost connection).
    assert len(killed) == kills, killed
    final = checkpoint.load_checkpoint(last)
    # Each group that the agent restarted resumed (resume=auto) and recorded it in the checkpoint it saved next.
    assert 1 <= len(final["trainer"]["history"]) <= kills, final["trainer"]["history"]
    assert out.count("(exitcode: ") >= 1, out[-4000:]
    return final, out


def test_a_restarted_group_agrees_on_a_new_store_namespace_not_the_dead_attempts() -> None:
    """torchrun's agent keeps one TCPStore across restarts; the previous attempt's keys (here its leader name,
    joins and heartbeats) are still there when the new processes start, rank 1 here before rank 0."""
    import threading

    store = torch.distributed.HashStore()
    store.set("frcnn_train/leader", "frcnn_train/dead")
    store.add("frcnn_train/dead/beat", 7)
    store.add("frcnn_train/dead/joined", 1)
    names: dict[int, str] = {}
    late_rank0 = threading.Timer(1.5, lambda: names.__setitem__(0, distributed._fresh_namespace(store, 0, 2)))
    late_rank0.daemon = True  # a rank 0 left waiting for a join that never comes must not hold pytest
    late_rank0.start()
    names[1] = distributed._fresh_namespace(store, 1, 2)
    late_rank0.join(timeout=10)
    assert names.get(0) == names[1] != "frcnn_train/dead"


def test_torchrun_restarts_after_a_rank_is_killed_and_ends_as_if_never_stopped(
    base: list[str], reference: dict, tmp_path: Path
) -> None:
    final, _ = kill_ranks(base, tmp_path, kills=1)
    assert_bitwise_equal(final, reference)


@pytest.mark.slow
def test_five_kills_of_random_ranks_at_random_steps(base: list[str], reference: dict, tmp_path: Path) -> None:
    final, _ = kill_ranks(base, tmp_path, kills=5)
    assert_bitwise_equal(final, reference)


# ------------------------------------------------------------------ another world size
def test_resume_on_one_then_two_processes_keeps_the_global_batch(base: list[str], reference: dict) -> None:
    """2 processes x 1 image -> 1 process x 1 image x accumulate 2 -> 2 processes again: same images, same LR;
    parameters equal a straight 2-process run up to float rounding.

    The one-process step (step 3) runs with the ranks' thread count, so each micro-batch's gradient is the one a
    rank computes; what differs is how the two are combined (accumulated here, all-reduced there), a rounding of
    the gradient at most. The weights are compared right after that step, with the straight run's at step 3: an
    SGD step moves a weight by lr x (gradient + weight decay), so that rounding moves it by ~lr x ulp, far inside
    the tolerance. Not later: in runs this tiny such a difference flips the RPN and RoI samplers' discrete choices
    within a few steps and then grows to percents of the weights, which a later comparison would measure instead.
    """
    out_dir = Path(_output_dir(base))
    torchrun(*base, "run_name=regrouped", "trainer.max_steps=2")
    # The straight run at step 3: resumed from the same step-2 checkpoint on 2 processes (bitwise the reference's
    # step 3, test_torchrun_stop_and_resume_matches_an_uninterrupted_run).
    shutil.copytree(out_dir / "regrouped", out_dir / "straight")
    torchrun(*base, f"resume={out_dir}/straight", "trainer.max_steps=3")
    overrides = [f"resume={out_dir}/regrouped", "trainer.max_steps=3"]  # one step on one process
    with torch_threads(WORKER_THREADS):
        summary = run(compose_config([*base, *overrides]), overrides=overrides)
    assert summary["global_step"] == 3
    one = checkpoint.load_checkpoint(out_dir / "regrouped" / "last.pth")
    assert (one["trainer"]["world_size"], one["trainer"]["accumulate"], one["config"]["trainer"]["accumulate"]) == (
        1,
        2,
        2,
    )
    assert (
        "world size 2 -> 1: trainer.accumulate 1 -> 2 keeps the global batch of 2 images (1 x 1 x 2)"
        in one["trainer"]["history"][-1]["changes"]
    )
    at_3 = checkpoint.load_checkpoint(out_dir / "straight" / "last.pth")
    assert at_3["trainer"]["global_step"] == 3 and at_3["trainer"]["world_size"] == 2
    # BatchNorm running statistics are left out: under DDP they are rank 0's images only.
    params = [k for k in at_3["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    # Measured largest difference: 0 (same thread count; two addends sum alike in either order, halving is
    # exact); 2.5e-7 with 2 threads on this side, against 3.7e-6 one step later, at step 4.
    for key in params:
        torch.testing.assert_close(one["model"][key], at_3["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    torchrun(*base, f"resume={out_dir}/regrouped", "trainer.max_steps=4")
    final = checkpoint.load_checkpoint(out_dir / "regrouped" / "last.pth")
    at_4 = checkpoint.load_checkpoint(out_dir / "reference" / "epoch_0001.pth")
    assert (
        final["trainer"]["global_step"] == at_4["trainer"]["global_step"] == 4 and final["trainer"]["accumulate"] == 1
    )
    assert final["scheduler"]["last_epoch"] == at_4["scheduler"]["last_epoch"]
    assert final["optimizer"]["param_groups"][0]["lr"] == at_4["optimizer"]["param_groups"][0]["lr"]
    assert any(not torch.equal(final["model"][k], one["model"][k]) for k in params), "trained on after the regroup"


def test_a_global_batch_the_new_world_size_cannot_keep_is_refused_naming_the_keys(compose_tiny) -> None:
    from frcnn_train.errors import ConfigError
    from frcnn_train.resume import keep_global_batch

    cfg = compose_tiny("trainer.batch_size=2")
    ckpt = {"trainer": {"world_size": 2, "batch_size": 2, "accumulate": 1}, "rng": {}}
    with pytest.raises(
        ConfigError,
        match=r"global batch of 4 images \(2 processes x trainer.batch_size=2 x "
        r"trainer.accumulate=1\) on 3 processes.*divides 2$",
    ):
        keep_global_batch(cfg, ckpt, 3)
    assert (
        keep_global_batch(cfg, {**ckpt, "trainer": {**ckpt["trainer"], "world_size": 4}}, 1)
        == "world size 4 -> 1: trainer.accumulate 1 -> 4 keeps the global batch of 8 images (1 x 2 x 4)"
    )
    assert cfg.trainer.accumulate == 4


# ------------------------------------------------------------------ several nodes
def test_two_nodes_train_stop_on_a_signal_and_resume(base: list[str], reference: dict, tmp_path: Path) -> None:
    """Two torchrun agents (two "nodes" of one process each) meet through a c10d rendezvous."""

    def nodes(*args: str, outputs: tuple[Path, Path]) -> list[subprocess.Popen]:
        launcher = (
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--rdzv-id=two-nodes",
        )
        # One process per node: torchrun would leave the thread count alone; start() pins the reference's.
        return [start(torchrun_cmd(*base, *args, f"output_dir={out}", launcher=launcher)) for out in outputs]

    # c10d orders the nodes by their agents' pids: the first started (writing to `shared`) is global rank 0.
    shared, elsewhere = tmp_path / "shared", tmp_path / "node1"
    first = nodes("run_name=nodes", "resume=auto", "trainer.checkpoint_every_steps=1", outputs=(shared, elsewhere))
    wait_for_step(shared / "nodes" / "last.pth", 2, first[0])
    for proc in first:  # scancel: SIGTERM to every agent
        os.kill(proc.pid, signal.SIGTERM)
    outs = [finish(proc, timeout=60) for proc in first]
    assert sum(out.count("Stopped at step") for out in outs) == 1, outs
    assert "Resume with:   torchrun --nnodes=2 --nproc_per_node=1" in "".join(outs)
    assert not elsewhere.exists(), "only global rank 0 writes files"
    second = nodes("run_name=nodes", "resume=auto", outputs=(shared, shared))
    outs = [finish(proc) for proc in second]
    assert all(proc.returncode == 0 for proc in second), outs[0][-3000:] + outs[1][-3000:]
    assert_bitwise_equal(checkpoint.load_checkpoint(shared / "nodes" / "last.pth"), reference)


def test_a_rank_stopped_by_a_signal_exits_0_under_torchrun(monkeypatch) -> None:
    """torchrun's agent would take the shell's 143 for a failed rank and restart the group (--max-restarts)."""
    from frcnn_train.runtime import exit_code_for

    stopped = {"completed": False, "stop_reason": "received SIGTERM"}
    assert exit_code_for(stopped) == 143
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert exit_code_for(stopped) == 0


# ------------------------------------------------------------------ BatchNorm
def test_syncbn_is_batchnorm_on_one_process_with_the_same_keys_and_fingerprint(compose_tiny, monkeypatch) -> None:
    from frcnn_train.errors import ConfigError
    from frcnn_train.launch import ddp_norm
    from frcnn_train.models import build_model
    from frcnn_train.models.fingerprint import architecture_spec, fingerprint

    bn, sync = (compose_tiny(f"model.backbone.norm={norm}", "model.num_classes=5") for norm in ("bn", "syncbn"))
    model = build_model(sync.model)
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert fingerprint(architecture_spec(sync.model), model) == fingerprint(
        architecture_spec(bn.model), build_model(bn.model)
    )
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(sync.model))
    assert isinstance(converted.backbone.body.bn1, torch.nn.SyncBatchNorm)
    assert list(converted.state_dict()) == list(model.state_dict())  # checkpoints move between bn and syncbn
    auto = compose_tiny("model.num_classes=5")
    assert (ddp_norm(auto, torch.device("cuda")), ddp_norm(auto, torch.device("cpu"))) == ("syncbn", "bn")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="model.backbone.norm=syncbn needs CUDA under torchrun"):
        distributed.wrap_model(model, norm="syncbn", device=torch.device("cpu"))
