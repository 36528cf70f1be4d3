"""What every command shares: device choice, determinism, AMP dtype, exit codes and the user-error line."""

from __future__ import annotations

import pytest
import torch

from frcnn_train.config import with_schema
from frcnn_train.errors import ConfigError, DataError
from frcnn_train.runtime import (
    EXIT_USER_ERROR,
    amp_dtype,
    cli,
    deterministic_mode,
    exit_code_for,
    interrupt_exit_code,
    resolve_device,
    seed_everything,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _restore_torch_switches():
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


@pytest.mark.parametrize(
    "value, device, expected",
    [
        ("auto", CPU, True),
        ("auto", CUDA, False),
        ("true", CUDA, True),
        ("false", CPU, False),
        ("True", CPU, True),
        ("False", CUDA, False),
        (True, CUDA, True),
    ],
)
def test_deterministic_auto_is_on_for_cpu_and_off_for_cuda(value, device, expected) -> None:
    assert deterministic_mode(value, device) is expected


def test_an_old_checkpoints_boolean_still_reads() -> None:
    old = with_schema({"trainer": {"deterministic": False}}).trainer.deterministic
    assert deterministic_mode(old, CPU) is False
    assert with_schema({}).trainer.deterministic == "auto"


def test_unknown_deterministic_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"trainer.deterministic='sometimes'.*auto, true or false"):
        deterministic_mode("sometimes", CPU)


def test_seed_everything_sets_the_switches_both_ways() -> None:
    assert seed_everything(0, "auto", CPU) is True
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    first = torch.rand(3)
    # Off (what auto means on CUDA): deterministic algorithms released, cudnn autotuning allowed.
    assert seed_everything(0, "false", CPU) is False
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert torch.equal(torch.rand(3), first), "the seed is applied either way"


def test_cuda_n_under_torchrun_is_refused_in_one_sentence(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ConfigError,
        match=r"device=cuda:1 under torchrun \(2 processes\).*device=cuda.*"
        r"CUDA_VISIBLE_DEVICES",
    ):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == CPU
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process may name its GPU
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == CUDA
    else:
        with pytest.raises(ConfigError, match="device=cuda:1 but CUDA is not available"):
            resolve_device("cuda:1")


def test_amp_dtype_per_device() -> None:
    assert amp_dtype(False, "fp16", CUDA) is None
    assert amp_dtype(True, "fp16", CPU, warn=False) is None
    assert amp_dtype(True, "bf16", CUDA) is torch.bfloat16
    with pytest.raises(ConfigError, match="trainer.amp_dtype='fp8'"):
        amp_dtype(True, "fp8", CUDA)


@pytest.mark.parametrize(
    "summary, code",
    [
        ({"completed": True, "stop_reason": None}, 0),
        ({"completed": False, "stop_reason": "trainer.max_steps=5 reached"}, 0),
        ({"completed": False, "stop_reason": "received SIGTERM"}, 143),
        ({"completed": False, "stop_reason": "received SIGINT"}, 130),
        ({"completed": False, "stop_reason": "another process received a stop signal"}, 143),
    ],
)
def test_exit_codes(summary, code) -> None:
    assert exit_code_for(summary) == code
    assert interrupt_exit_code() == 130


def test_cli_turns_a_user_error_into_one_line_and_exit_2(capsys) -> None:
    @cli
    def main(argv: list[str] | None = None) -> int:
        raise DataError("images/ does not exist; point data.root at the dataset")

    assert main([]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "error: images/ does not exist; point data.root at the dataset\n"


def test_cli_turns_ctrl_c_into_one_line_and_exit_130(capsys) -> None:
    @cli
    def main(argv: list[str] | None = None) -> int:
        raise KeyboardInterrupt

    assert main([]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_amp_on_a_cpu_is_bf16_where_it_has_bf16_kernels(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from frcnn_train import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.amp_dtype(True, "bf16", cpu) is torch.bfloat16
    assert runtime.amp_dtype(True, "fp16", cpu) is None  # no fast fp16 CPU kernels: fp32, with a warning
    assert any("trainer.amp_dtype=bf16 trains in bf16 on CPUs" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(
        ConfigError,
        match=r"^trainer.amp_dtype=bf16 on this CPU, which has no bf16 kernels .*"
        r"set trainer.amp=false",
    ):
        runtime.amp_dtype(True, "bf16", cpu)
    assert runtime.amp_dtype(False, "bf16", cpu) is None
