"""Hydra's and OmegaConf's composition errors as the one sentence every frcnn-* command prints.

Hydra reports a bad override, an unknown group option, a missing `--config-dir` or a
YAML syntax error in several lines of its own (or a 95-line traceback, for YAML) and
exits 1; these are the user's errors, so they end like every other one: `error: ...`
naming the key, file or option and the fix, exit 2.
"""

from __future__ import annotations

import re

from frcnn_train.errors import ConfigError

_FIX = "fix the key or the value (configs/train.yaml and frcnn_train/config.py list them)"


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0].strip() if str(err).strip() else type(err).__name__


def _yaml_error(err: BaseException) -> ConfigError:
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    context = getattr(err, "context", None)
    if context and context_mark and (not mark or context_mark.name == mark.name):
        context = f"{context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1}"
    problem = getattr(err, "problem", None) or _first_line(err)
    name = mark.name if mark and mark.name and not mark.name.startswith("<") else "a config file"
    return ConfigError(
        f"{name} is not valid YAML: {problem}{where}{f' ({context})' if context else ''}; fix the syntax there"
    )


def _options(text: str) -> str:
    """ "available options in 'model/backbone': a, b, c" from Hydra's multi-line MissingConfigException."""
    found = re.search(r"Available options in '([^']*)':\n((?:\t.*\n?)*)", text)
    if not found:
        return ""
    options = [line.strip() for line in found.group(2).splitlines() if line.strip()]
    return f"; available options in '{found.group(1)}': {', '.join(options) or 'none'}"


def composition_error(err: BaseException) -> ConfigError | None:
    """The one-sentence ConfigError for a composition error the user made; None for anything else."""
    import yaml
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException, SearchPathException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, yaml.YAMLError):
        return _yaml_error(err)
    if isinstance(err, ConfigError):
        return err
    if isinstance(err, SearchPathException):
        return ConfigError(
            f"--config-dir: {_first_line(err)}; give the directory that holds your own configs "
            "(e.g. my_configs, with my_configs/experiment/<name>.yaml)"
        )
    if isinstance(err, MissingConfigException):
        options = _options(str(err))
        fix = "choose one of those, or add the file" if options else "name a config that exists"
        return ConfigError(f"{_first_line(err).rstrip('.')}{options}; {fix} (your own under --config-dir)")
    if isinstance(err, OverrideParseException):
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("See ")]
        detail = "; ".join(lines[1:] if lines[0].startswith("Error parsing override") else lines[:1])
        if "while evaluating" in detail:  # a sweep function: choice(...), interval(...)
            fix = "write it as Hydra's override grammar does, e.g. choice(0.01,0.02), range(1,5), interval(0.001,0.1)"
        else:
            fix = (
                "write it as key=value, and quote a value with characters other than ASCII letters, digits, "
                "spaces and / . - _ : inside the override, e.g. \"output_dir='/data/runs ü'\" (the outer quotes "
                "are for the shell); a list is written data.classes=[a,b]"
            )
        return ConfigError(f"the override {err.override!r} does not parse ({detail}); {fix}")
    if isinstance(err, HydraException) and str(err).startswith("Ambiguous value"):
        return ConfigError(
            f"{_first_line(err)}: a comma makes a sweep; write a list as key=[a,b], a string with a "
            "comma quoted inside the override as \"key='a,b'\", or sweep over the values with -m"
        )
    if isinstance(err, HydraException):
        cause = err.__cause__
        detail = f": {_first_line(cause)}" if isinstance(cause, OmegaConfBaseException) else ""
        if isinstance(cause, yaml.YAMLError):
            return _yaml_error(cause)
        return ConfigError(f"{_first_line(err).rstrip('.')}{detail}; {_FIX}")
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        where = f" (in {key})" if key else ""
        return ConfigError(f"the config does not resolve{where}: {_first_line(err)}; {_FIX}")
    return None


def resolved_overrides(cfg: object, overrides: object) -> list[str]:
    """The overrides as strings, once every ${...} in them and in `cfg` resolves: a bad interpolation is
    the user's error, one sentence before any work."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
        return [str(override) for override in overrides]  # type: ignore[union-attr]
    except OmegaConfBaseException as err:
        raise composition_error(err) from None
