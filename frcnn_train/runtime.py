"""What every command shares: device choice, AMP dtype, seeding and determinism, exit codes.

Training, `evaluate` and `predict` pick the device and the autocast dtype the
same way, so a checkpoint evaluated after training scores what the run logged.
The four CLIs end the same way: a user error is one line on stderr and exit 2.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shlex
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from frcnn_train import distributed
from frcnn_train.errors import ConfigError, UserError

# Exit codes of every frcnn-* command (docs/exit-codes.md).
EXIT_OK = 0  # finished (or stopped where asked: trainer.max_steps)
EXIT_USER_ERROR = 2  # one sentence on stderr names the cause; nothing on disk changed
# Stopped by a signal after saving last.pth: resumable. The shell's 128 + signal
# number, so schedulers and scripts read it as "interrupted" (SIGINT 130, SIGTERM 143).
EXIT_SIGNAL_BASE = 128

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch.device; under torchrun `cuda` is this rank's GPU.

    `cuda:N` under torchrun with several processes is refused: it would put every
    rank on one GPU. GPUs are chosen with CUDA_VISIBLE_DEVICES, as torchrun expects.
    """
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if name.startswith("cuda:") and launched > 1:
        raise ConfigError(
            f"device={name} under torchrun ({launched} processes) would put every process on GPU "
            f"{name.split(':', 1)[1]}; use device=cuda, which gives each process the GPU of its LOCAL_RANK, "
            "and pick the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if name == "cuda":
        name = f"cuda:{distributed.local_rank()}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} but CUDA is not available on this machine; use device=cpu (device may change on resume)"
        )
    return device


def deterministic_mode(value: Any, device: torch.device) -> bool:
    """`trainer.deterministic` (auto / true / false) for this device: auto is on for CPU, off for CUDA.

    Old checkpoints hold a bool; the schema stores it as the string "True"/"False".
    """
    text = str(value).strip().lower()
    if text == "auto":
        return device.type != "cuda"
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"trainer.deterministic={value!r} is not a choice; use auto, true or false")


def seed_sequence(*words: int) -> np.random.SeedSequence:
    """numpy's SeedSequence over `words`; negative words (a negative user seed) still map to one stream."""
    return np.random.SeedSequence([w % 2**64 for w in words])


def seed_for(seed: int, *words: int) -> int:
    """A 63-bit seed that depends only on `seed` and `words` (e.g. step and sample chunk)."""
    return int(seed_sequence(seed, *words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def global_seed(seed: int) -> int:
    """The seed for python's, numpy's and torch's global generators: `seed` itself in [0, 2**32), numpy's
    range (so the usual seeds keep their runs); any other integer (negative, or larger) is a fixed seed
    too, hashed into that range, so -1 and 1 (which python's random.seed takes alike) differ."""
    return seed if 0 <= seed < 2**32 else int(seed_sequence(seed).generate_state(1)[0])


def seed_everything(seed: int, deterministic: Any, device: torch.device) -> bool:
    """Seed python, numpy and torch, and set the determinism switches; returns whether it is on.

    On: deterministic algorithms, no cudnn autotuning, no TF32 (bitwise resume on
    CPU). Off: cudnn.benchmark and TF32 matmul/conv, the fast CUDA settings.
    """
    on = deterministic_mode(deterministic, device)
    seed = global_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: a few CUDA kernels (roi_align backward) have no deterministic version.
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on
    _allow_tf32(not on)
    return on


def _allow_tf32(allow: bool) -> None:
    # torch >= 2.9 has per-backend fp32_precision and refuses mixing it with the old allow_tf32 flags.
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if allow else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if allow else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def amp_dtype(amp: bool, dtype_name: str, device: torch.device, *, warn: bool = True) -> torch.dtype | None:
    """The autocast dtype for `trainer.amp` / `trainer.amp_dtype` on `device`; None: fp32.

    CUDA: fp16 (with loss scaling) or bf16. CPU: bf16 where oneDNN has bf16 kernels (AVX-512
    and newer: about 1.3x faster steps); fp16 autocast on a CPU has no fast kernels, so it
    trains in fp32 with a warning.
    """
    if not amp:
        return None
    if dtype_name not in _DTYPES:
        raise ConfigError(f"trainer.amp_dtype={dtype_name!r} is not supported; choose fp16 or bf16")
    if device.type == "cuda":
        return _DTYPES[dtype_name]
    if device.type == "cpu" and dtype_name == "bf16":
        if not cpu_has_fast_bf16():
            raise ConfigError(
                f"trainer.amp_dtype=bf16 on this CPU, which has no bf16 kernels (torch sees "
                f"{torch.backends.cpu.get_cpu_capability()}; they need AVX-512 or newer), so bf16 autocast would "
                "be slower than fp32; set trainer.amp=false (precision may change on resume)"
            )
        return torch.bfloat16
    if warn:
        from frcnn_train.logs import log

        hint = "; trainer.amp_dtype=bf16 trains in bf16 on CPUs with AVX-512" if device.type == "cpu" else ""
        log.warning("trainer.amp with %s applies to CUDA only; training in fp32 on %s%s.", dtype_name, device, hint)
    return None


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (what torch's own CPU autocast tests ask)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def precision_name(dtype: torch.dtype | None) -> str:
    """ "fp32", "fp16" or "bf16": how a run's precision is recorded in its checkpoint."""
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def exit_code_for(summary: dict[str, Any]) -> int:
    """A finished run (or one stopped at trainer.max_steps) 0; stopped by a signal after saving: 128 + its number."""
    reason = summary.get("stop_reason") or ""
    if summary.get("completed") or not reason or "max_steps" in reason:
        return EXIT_OK
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # Under torchrun the agent reads a non-zero exit as a failed rank: it would report a failure
        # or, with --max-restarts, restart the group, which resume=auto would train on. The agent
        # itself exits with its own code when it was the one signalled.
        return EXIT_OK
    named = re.search(r"\bSIG[A-Z]+\b", reason)
    # Another rank's signal ("another process received a stop signal") reads as SIGTERM, what torchrun forwards.
    signum = getattr(signal, named.group(0), signal.SIGTERM) if named else signal.SIGTERM
    return EXIT_SIGNAL_BASE + int(signum)


def interrupt_exit_code() -> int:
    """Ctrl-C that ended the process at once (start-up, or a repeated Ctrl-C): 130, as a shell reports it."""
    return EXIT_SIGNAL_BASE + int(signal.SIGINT)


def prog_name(module: str) -> str:
    """How the user called a CLI, for its usage line: `frcnn-evaluate` or `python -m frcnn_train.evaluate`."""
    called = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return called if called.startswith("frcnn-") else f"python -m {module}"


# A value Hydra reads as itself and a shell as one word, unquoted; anything else is quoted for both.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./-]+")


def override_arg(key: str, value: Any) -> str:
    """`key=value` as one shell word that Hydra reads back as `value`: for a printed command to paste.

    A value with spaces, non-ASCII letters or Hydra's own characters is double-quoted for Hydra
    (backslashes before a quote doubled, `${` escaped), and the whole word quoted for the shell.
    """
    text = str(value)
    if not _PLAIN_VALUE.fullmatch(text):
        text = text.replace("${", "\\${")
        text = (
            '"'
            + re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), text)
            + '"'
        )
    return shlex.quote(f"{key}={text}")


def user_error_exit(err: UserError) -> int:
    """Print a user error as the one line every command prints; returns the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return EXIT_USER_ERROR


F = TypeVar("F", bound=Callable[..., int])


def cli(func: F) -> F:
    """Wrap a CLI's `main(argv) -> int`: a UserError becomes one line on stderr and exit code 2,
    Ctrl-C one line and exit code 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            return user_error_exit(err)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return interrupt_exit_code()

    return wrapper  # type: ignore[return-value]
