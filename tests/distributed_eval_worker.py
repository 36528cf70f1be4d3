"""Run by tests/test_distributed.py under torchrun: the evaluation a DDP run does, on a model whose
BatchNorm statistics differ per rank (as DDP leaves them); each rank writes what it got to OUT/rank<N>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from frcnn_train import distributed
from frcnn_train.config import compose_config
from frcnn_train.data import build_datasets, build_eval_loader
from frcnn_train.evaluation import evaluate
from frcnn_train.models import build_model


def main(out: Path, overrides: list[str]) -> None:
    cfg = compose_config(overrides)
    device = torch.device("cpu")
    distributed.init_from_env(device)
    data = build_datasets(cfg.data, with_masks=False)
    cfg.model.num_classes = len(data.classes)
    torch.manual_seed(0)  # the same weights on every rank
    model = build_model(cfg.model, read_backbone_weights=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.add_(0.05 * distributed.rank())
    distributed.broadcast_buffers(model)  # what Trainer.evaluate does first
    loader = build_eval_loader(
        data.val,
        batch_size=cfg.trainer.batch_size,
        num_workers=0,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    metrics, results = evaluate(
        model, loader, coco_gt=data.val.coco, label_to_cat_id=data.val.label_to_cat_id, device=device, with_masks=False
    )
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps({"metrics": metrics, "results": results}))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
