"""The documentation site: generated reference pages that match the code, a strict build, and the
getting-started commands as a newcomer types them."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, python_path
from frcnn_train.config import CONFIG_DIR, check_values, compose_config

sys.path.insert(0, str(REPO / "scripts"))
import gen_docs  # noqa: E402  (scripts/ is no package)

GETTING_STARTED = REPO / "docs" / "getting-started.md"


def _table_rows(page: str) -> dict[str, list[str]]:
    """First cell (without backticks) -> the row's cells, for every table row of a page."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    return rows


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_config_reference_lists_every_key_with_the_default_runs_value_and_a_meaning() -> None:
    from omegaconf import OmegaConf

    rows = _table_rows(gen_docs.config_reference())
    expected = _flatten(OmegaConf.to_container(compose_config(), resolve=False))
    assert len(expected) >= 100  # a sanity floor: the schema had 100 keys when this was written
    for key, value in expected.items():
        assert key in rows, f"{key} is missing from the configuration reference"
        default = rows[key][2].strip("`")
        assert yaml.safe_load(default) == value, f"{key}: the page says {default}, the default run has {value!r}"
    # Every field of the schema, list items included, says what it is (its comment in config.py).
    keys = [k for section in gen_docs.schema_sections() for k in section.keys]
    assert {k.name for k in keys} >= set(expected)
    assert not [k.name for k in keys if not k.meaning], "fields of frcnn_train/config.py without a comment"
    for key in ("optim.param_groups[].match", "optim.param_groups[].lr_mult", "optim.param_groups[].freeze"):
        assert key in rows


def test_config_reference_lists_every_option_of_every_group() -> None:
    page = gen_docs.config_reference()
    groups = page.split("## Config groups")[1]
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        group = path.parent.relative_to(CONFIG_DIR).as_posix()
        if group == ".":
            continue
        assert f"### `{group}`\n" in groups, f"the group {group} is missing from the configuration reference"
        section = groups.split(f"### `{group}`\n")[1].split("\n### ")[0]
        assert f"| `{path.stem}`" in section, f"{group}={path.stem} is missing from the configuration reference"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """The console commands of pyproject.toml and their parsers, found without the generator's list."""
    import tomllib
    from hydra._internal.utils import get_args_parser

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    parsers = {}
    for command, target in scripts.items():
        module = importlib.import_module(target.split(":")[0])
        parsers[command] = get_args_parser() if module.__name__ == "frcnn_train.train" else module.build_parser()
    return parsers


def test_cli_reference_lists_every_option_of_every_command() -> None:
    page = gen_docs.cli_reference()
    parsers = _parsers()
    assert len(parsers) >= 5
    for command, parser in parsers.items():
        assert f"## `{command}`\n" in page, f"{command} is missing from the command-line reference"
        section = page.split(f"## `{command}`\n")[1].split("\n## ")[0]
        _assert_every_option(command, parser, section)
        for name, sub in gen_docs.subcommands(parser).items():  # frcnn-data check|stats|show
            assert f"### `{command} {name}`\n" in section, f"{command} {name} is missing from the reference"
            _assert_every_option(f"{command} {name}", sub, section.split(f"### `{command} {name}`\n")[1])


def _assert_every_option(command: str, parser: argparse.ArgumentParser, section: str) -> None:
    rows = _table_rows(section.split("\n### ")[0])
    for action in parser._actions:
        names = action.option_strings or [action.dest]
        row = next((cells for first, cells in rows.items() if set(names) <= set(re.split(r"[ ,]+", first))), None)
        assert row is not None, f"{command} {names[0]} is missing from the command-line reference"
        if action.help and action.help != argparse.SUPPRESS:
            assert " ".join(str(action.help).split())[:40] in row[2].replace("\\|", "|"), (command, names)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason='mkdocs is not installed: pip install -e ".[docs]"'
)
def test_the_site_builds_strictly_with_the_generated_pages(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": python_path(), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trainer.ema.decay" in (site / "reference" / "configuration" / "index.html").read_text()
    assert "--check-images" in (site / "reference" / "cli" / "index.html").read_text()


def _code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_the_two_commands_are_the_same_in_readme_getting_started_and_ci() -> None:
    install_and_train, install_and_test = _code_blocks(GETTING_STARTED, "bash")
    readme = (REPO / "README.md").read_text().splitlines()
    assert install_and_train.strip() in readme and install_and_test.strip() in readme, "README's two commands differ"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test.strip() in ci, ".ci/run must run the test command exactly as documented"


def _train_commands(page: Path) -> list[list[str]]:
    """The overrides of every training command in a page's code blocks (line continuations joined)."""
    commands = []
    for block in re.findall(r"^ *```[a-z]*\n(.*?)^ *```", page.read_text(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.lstrip().startswith(("python -m frcnn_train.train", "frcnn-train", "torchrun", "srun")):
                continue  # printed output ("Resume with: ...") is no command
            words = shlex.split(line, comments=True)
            for entry in ("frcnn_train.train", "frcnn-train"):
                if entry in words and "--config-dir" not in words and "-m" not in words[words.index(entry) :]:
                    commands.append(words[words.index(entry) + 1 :])
    return commands


def test_the_training_commands_of_every_page_compose() -> None:
    """Each training command of the README and the site is a valid config (no renamed key, no refused value);
    those with --config-dir (a directory of the reader's) and sweeps (-m) are left out."""
    count = 0
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for overrides in _train_commands(page):
            try:
                check_values(compose_config(overrides))
            except Exception as err:  # noqa: BLE001  (any failure to compose is the finding)
                raise AssertionError(f"{page.name}: {' '.join(overrides)}: {err}") from err
            count += 1
    assert count >= 30


@pytest.mark.slow
def test_getting_started_install_and_train_as_written(tmp_path: Path) -> None:
    """The first command of docs/getting-started.md, as a newcomer runs it: in a fresh copy of the
    repository, into a new virtual environment from the package index, and the full default run (about
    four minutes of training after the install). The second command, the tests, is what .ci/run runs
    (test_the_two_commands_are_the_same_in_readme_getting_started_and_ci)."""
    clone = tmp_path / "frcnn_train"
    shutil.copytree(
        REPO,
        clone,
        ignore=shutil.ignore_patterns(
            ".venv", "outputs", "site", ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".whl"
        ),
    )
    command = _code_blocks(GETTING_STARTED, "bash")[0].strip()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FRCNN_DATA_CACHE"] = str(tmp_path / "cache")  # a newcomer's empty cache, kept in tmp_path
    proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=7200)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    # The printed end of the run as the page shows it: the words of each line; numbers vary by host.
    shown = _code_blocks(GETTING_STARTED, "text")[0].splitlines()
    assert shown[0] in output
    for line in shown[1:]:
        words = [w for w in line.split() if not re.fullmatch(r"[\d.]+|-", w)]
        assert any(
            words == [w for w in out.split() if not re.fullmatch(r"[\d.]+|-", w)] for out in output.splitlines()
        ), f"the run printed no line like {line!r}"
    assert "Resume with:" in output
    assert list((clone / "outputs").glob("*/best.pth"))


def test_the_readmes_zoo_table_is_torchvisions_metadata() -> None:
    """README's table of the zoo, typed by hand, against each weights enum's own COCO figures."""
    import torchvision

    rows = re.findall(r"^\| `(\w+)` \| ([\d.]+) \|\s*([\d.]*)\s*\|$", (REPO / "README.md").read_text(), flags=re.M)
    assert len(rows) == 6, rows
    for builder, box, mask in rows:
        metrics = torchvision.models.get_model_weights(builder).DEFAULT.meta["_metrics"]["COCO-val2017"]
        assert float(box) == metrics["box_map"], builder
        assert (float(mask) if mask else None) == metrics.get("mask_map"), builder
