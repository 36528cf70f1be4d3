"""torchrun: process-group setup, rank queries, the agreed stop, gathers to rank 0.

Outside torchrun every function behaves as a single process of rank 0.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from frcnn_train.errors import ConfigError

# A signal arriving this soon after the first is the same request: under torchrun a rank can get
# SIGINT/SIGTERM both from the agent (which forwards it) and from the terminal or SLURM directly.
SIGNAL_DEBOUNCE_S = 1.0
_JOIN_PROBE_S = 1.0


def init_from_env(device: torch.device) -> None:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE, if any.

    The group gets a store namespace of its own (see `_fresh_namespace`), because
    torchrun's agent keeps one TCPStore for the whole job: a group restarted after
    a failure would otherwise read the dead processes' gloo addresses left there by
    the previous attempt and fail with `connectFullMesh failed ... Connection refused`
    (pytorch issue 135712).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=30)
    store, rank_, size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(_fresh_namespace(store, rank_, size), store)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo", store=store, rank=rank_, world_size=size, timeout=timeout
    )
    use_host_memory_for_objects(device, timeout)


_object_group: Any = None  # None: the default group (gloo already, or no process group)


def use_host_memory_for_objects(device: torch.device, timeout: datetime.timedelta) -> None:
    """Python objects (evaluation results, RNG states) travel through gloo, in host memory: through NCCL they
    would be pickled into CUDA tensors, every rank's on rank 0's GPU at once (detectron2's gloo group).
    Every rank calls it once, after the default group is made."""
    global _object_group
    _object_group = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None


def _fresh_namespace(store: dist.Store, rank_: int, size: int) -> str:
    """A key prefix that every process of this group start, and no earlier one, agrees on.

    Rank 0 publishes a new random name and keeps a heartbeat counter under it
    ticking until every other rank has joined. The others read the published
    name and join it only once they see its heartbeat move: a name left by the
    previous attempt has no live process behind it (the agent stops every worker
    before it starts new ones), so they wait for rank 0 to publish the new one.
    TORCHELASTIC_RESTART_COUNT cannot serve: on several nodes only the node that
    failed counts a restart.
    """
    leader = "frcnn_train/leader"
    if rank_ == 0:
        name = f"frcnn_train/{uuid.uuid4().hex}"
        store.set(leader, name)
        while int(store.add(f"{name}/joined", 0)) < size - 1:
            store.add(f"{name}/beat", 1)
            time.sleep(0.05)
        return name
    while True:
        name = store.get(leader).decode()
        before = int(store.add(f"{name}/beat", 0))
        time.sleep(_JOIN_PROBE_S)
        if int(store.add(f"{name}/beat", 0)) > before:
            store.add(f"{name}/joined", 1)
            return name


def shutdown() -> None:
    global _object_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _object_group = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_to_main(item: Any) -> list[Any] | None:
    """Every rank's `item` on rank 0 (in rank order), None elsewhere: only rank 0 needs them."""
    if not dist.is_initialized():
        return [item]
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(item, gathered, dst=0, group=_object_group)
    return gathered


def gather_lists(items: list[Any]) -> list[Any]:
    """Concatenate every rank's list on rank 0 (in rank order); other ranks get []."""
    gathered = gather_to_main(items)
    return [item for part in gathered for item in part] if gathered is not None else []


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled; small things such as metrics)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_object_group)
    return box[0]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them only at the start of a training forward, so after the last
    step each rank holds its own statistics; evaluation and the checkpoint use rank 0's.
    """
    if not dist.is_initialized():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any."""
    if not dist.is_initialized():
        return flag
    return bool(max_over_ranks(torch.tensor(flag, device=device)).item())


def max_over_ranks(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a bool tensor over all ranks (one all_reduce); itself on one process."""
    if not dist.is_initialized():
        return flags
    values = flags.to(torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.bool()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of a float tensor over all ranks (one all_reduce, as torchvision's reduce_dict); itself alone."""
    if not dist.is_initialized():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()


def wrap_model(model: nn.Module, *, norm: str, device: torch.device) -> nn.Module:
    """DDP around `model` under torchrun (SyncBatchNorm first when `norm` is syncbn); else `model`.

    `norm` is the resolved backbone norm. SyncBatchNorm keeps BatchNorm2d's
    state-dict keys, so checkpoints move between bn and syncbn runs.
    """
    if world_size() <= 1:
        return model
    if norm == "syncbn":
        if device.type != "cuda":
            raise ConfigError(
                "model.backbone.norm=syncbn needs CUDA under torchrun (torch's SyncBatchNorm has no CPU "
                "kernels); use model.backbone.norm=bn on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def launcher() -> str:
    """The command prefix that started this process, for the printed resume command."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and world_size() <= 1:
        return "python -m"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    words = ["torchrun"]
    if nodes > 1:
        words += [
            f"--nnodes={nodes}",
            f"--nproc_per_node={per_node}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=<host:port>",
        ]
    else:
        words += [f"--nproc_per_node={per_node}"]
    if restarts:
        words.append(f"--max-restarts={restarts}")
    return " ".join(words + ["-m"])


class StopRequest:
    """SIGINT / SIGTERM handling for the training loop: the first request finishes the step and
    saves; a repeat (after SIGNAL_DEBOUNCE_S, so the agent's forwarded copy does not count)
    aborts at once. The checkpoint writer's atomic rename keeps last.pth whole either way."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            self.reason, self._first = f"received {name}", time.monotonic()
            # Straight to the file descriptor: logging from a signal handler can land inside a write the
            # main thread is making and fail as a reentrant call. train.log gets the reason at the stop.
            line = f"{name}: finishing this step, then saving last.pth (send again to abort without saving).\n"
            try:
                os.write(sys.stderr.fileno(), line.encode())
            except (OSError, ValueError):  # stderr closed or not a real file
                pass
        elif time.monotonic() - self._first > SIGNAL_DEBOUNCE_S:
            raise KeyboardInterrupt
