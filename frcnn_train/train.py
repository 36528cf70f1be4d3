"""`python -m frcnn_train.train [overrides]`: compose the config with Hydra, then run it."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from frcnn_train.config import register_schema
from frcnn_train.errors import UserError
from frcnn_train.launch import run

register_schema()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, overrides=HydraConfig.get().overrides.task)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
