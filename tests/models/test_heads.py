"""models/heads.py: batched post-processing equals torchvision's per-image code; fp32 boxes under autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from conftest import assert_same_detections
from frcnn_train.data import build_datasets, build_eval_loader
from frcnn_train.evaluation import evaluate
from frcnn_train.models import architecture_spec, build_model, fingerprint, tensor_layout
from frcnn_train.models.heads import BatchedRoIHeads, BatchedRPN, grouped_nms, specialise


def _random_boxes(n: int, size: float, generator: torch.Generator) -> torch.Tensor:
    # Some boxes stick out of the image and some are tiny, so clipping and the size filter both act.
    xy = torch.rand(n, 2, generator=generator) * size * 1.1 - 0.05 * size
    wh = torch.rand(n, 2, generator=generator) ** 2 * size * 0.6
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("per_level", [[600, 150, 40, 10], [3000, 800, 200]])  # coordinate trick / per-group path
@pytest.mark.parametrize("training", [True, False])
def test_rpn_filter_equals_torchvision(per_level: list[int], training: bool) -> None:
    g = torch.Generator().manual_seed(sum(per_level) + training)
    stock = RegionProposalNetwork(
        None,
        None,
        0.7,
        0.3,
        256,
        0.5,
        dict(training=250, testing=120),
        dict(training=300, testing=90),
        0.7,
        score_thresh=0.02,
    )
    ours = specialise(copy.deepcopy(stock), BatchedRPN)
    shapes = [(96, 128), (128, 80), (120, 120)]
    proposals = torch.stack([_random_boxes(sum(per_level), 128, g) for _ in shapes])
    objectness = torch.randn(len(shapes) * sum(per_level), 1, generator=g) * 3
    for module in (stock, ours):
        module.train(training)
    want = stock.filter_proposals(proposals, objectness, shapes, per_level)
    got = ours.filter_proposals(proposals, objectness, shapes, per_level)
    for w, o in zip(want, got):
        assert len(w) == len(o) == len(shapes)
        assert all(torch.equal(a, b) for a, b in zip(w, o))
    assert 0 < sum(len(b) for b in got[0]) <= len(shapes) * stock.post_nms_top_n()


@pytest.mark.parametrize("num_proposals", [30, 400])
def test_detection_postprocess_equals_torchvision(num_proposals: int) -> None:
    g = torch.Generator().manual_seed(num_proposals)
    num_classes = 6
    stock = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 40)
    ours = specialise(copy.deepcopy(stock), BatchedRoIHeads)
    shapes = [(100, 90), (64, 128), (128, 128)]
    proposals = [_random_boxes(num_proposals, 128, g) for _ in shapes]
    logits = torch.randn(num_proposals * len(shapes), num_classes, generator=g) * 2
    deltas = torch.randn(num_proposals * len(shapes), num_classes * 4, generator=g) * 0.3
    want = stock.postprocess_detections(logits, deltas, proposals, shapes)
    got = ours.postprocess_detections(logits, deltas, proposals, shapes)
    assert len(want) == len(got) == 3, "boxes, scores and labels"
    for w, o in zip(want, got):
        assert len(w) == len(o) == len(shapes)
        assert all(torch.equal(a, b) for a, b in zip(w, o))
    assert any(len(b) == 40 for b in got[0]) and all(len(b) > 0 for b in got[0])


def test_grouped_nms_in_chunks_equals_per_group_nms() -> None:
    g = torch.Generator().manual_seed(0)
    boxes, scores = _random_boxes(900, 100, g), torch.rand(900, generator=g)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    groups = torch.randint(0, 13, (900,), generator=g)
    want = box_ops._batched_nms_vanilla(boxes, scores, groups, 0.5)
    for chunk in (100, 250, 10_000):  # many chunks, a few, one offset call
        assert torch.equal(grouped_nms(boxes, scores, groups, 0.5, chunk=chunk), want)


def test_state_dict_and_fingerprint_are_torchvisions(compose_tiny) -> None:
    for arch, stock_cls in (("faster_rcnn", FasterRCNN), ("mask_rcnn", MaskRCNN)):
        cfg = compose_tiny(f"model={arch}")
        cfg.model.num_classes = 3
        ours = build_model(cfg.model)
        parts = {k: getattr(ours.roi_heads, k) for k in ("box_roi_pool", "box_head", "box_predictor")}
        if arch == "mask_rcnn":
            parts.update({k: getattr(ours.roi_heads, k) for k in ("mask_roi_pool", "mask_head", "mask_predictor")})
        stock = stock_cls(ours.backbone, num_classes=None, rpn_anchor_generator=ours.rpn.anchor_generator, **parts)
        assert tensor_layout(ours) == tensor_layout(stock)
        assert list(ours.state_dict()) == list(stock.state_dict())
        assert isinstance(ours.rpn, RegionProposalNetwork) and isinstance(ours.roi_heads, RoIHeads)
        # The fingerprint hashes the spec and the tensor layout, so it equals the stock model's.
        spec = architecture_spec(cfg.model)
        assert fingerprint(spec, ours) == fingerprint(spec, stock)


def test_evaluation_under_autocast_equals_fp32(compose_tiny) -> None:
    """One model evaluated with and without (bf16) autocast: the same detections within 1e-3 px."""
    cfg = compose_tiny()
    data = build_datasets(cfg.data, with_masks=False)
    cfg.model.num_classes = len(data.classes)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    runs = {}
    for dtype in (None, torch.bfloat16):
        loader = build_eval_loader(data.val, batch_size=2, num_workers=0)
        _, runs[dtype] = evaluate(
            model,
            loader,
            coco_gt=data.val.coco,
            label_to_cat_id=data.val.label_to_cat_id,
            device=torch.device("cpu"),
            with_masks=False,
            autocast_dtype=dtype,
        )
    fp32, amp = runs[None], runs[torch.bfloat16]
    assert len(fp32) > 20 and len(amp) == len(fp32)

    def detections(results: list[dict], image_id: int) -> dict[str, torch.Tensor]:
        mine = [r for r in results if r["image_id"] == image_id]
        return {
            "boxes": torch.tensor([r["bbox"] for r in mine]),
            "labels": torch.tensor([r["category_id"] for r in mine]),
            "scores": torch.tensor([r["score"] for r in mine]),
        }

    # Paired by label and nearest box per image, not by position: where bf16 rounds differently two near-equal
    # scores may swap places. Measured here: no difference at all. Boxes: the results round them to 3 decimals, so
    # a difference far below 1e-3 px can flip a rounding and show as 1e-3; 2e-3 allows that once.
    for image_id in sorted({r["image_id"] for r in fp32}):
        got, want = detections(amp, image_id), detections(fp32, image_id)
        assert_same_detections(got, want, atol={"boxes": 2e-3, "labels": 0, "scores": 1e-5})


def test_training_proposals_are_decoded_in_fp32_under_autocast(compose_tiny) -> None:
    cfg = compose_tiny()
    cfg.model.num_classes = 3
    model = build_model(cfg.model).train()
    seen, filter_proposals = [], model.rpn.filter_proposals

    def spy(proposals, objectness, *args):  # the decoded proposals, before any filtering
        seen.append((proposals.dtype, objectness.dtype))
        return filter_proposals(proposals, objectness, *args)

    model.rpn.filter_proposals = spy
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])} for _ in images]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert seen == [(torch.float32, torch.bfloat16)]  # the head ran in bf16, the decode in fp32
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sizes", [[(128, 128), (128, 128)], [(128, 128), (64, 80)], [(96, 128)]])
def test_same_size_transform_equals_torchvision(training: bool, sizes: list[tuple[int, int]]) -> None:
    """Images at the model's size skip the resample; others are resized as torchvision does; the RNG moves alike."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from frcnn_train.models.heads import SameSizeTransform

    g = torch.Generator().manual_seed(sum(h + w for h, w in sizes) + training)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = [
        {
            "boxes": _random_boxes(3, 90, g),
            "labels": torch.ones(3, dtype=torch.int64),
            "masks": torch.rand(3, h, w, generator=g) > 0.5,
        }
        for h, w in sizes
    ]
    stock = GeneralizedRCNNTransform(128, 128, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ours = specialise(copy.deepcopy(stock), SameSizeTransform)
    results = []
    for module in (stock, ours):
        module.train(training)
        torch.manual_seed(0)
        batch, out_targets = module([i.clone() for i in images], copy.deepcopy(targets))
        results.append((batch.tensors, batch.image_sizes, out_targets, torch.rand(1)))
    (want, want_sizes, want_targets, want_next), (got, got_sizes, got_targets, got_next) = results
    assert torch.equal(got, want) and got_sizes == want_sizes and torch.equal(got_next, want_next)
    for w, o in zip(want_targets, got_targets):
        assert w.keys() == o.keys() and all(torch.equal(w[k], o[k]) and w[k].dtype == o[k].dtype for k in w)


def test_uint8_becomes_the_float_the_cpu_conversion_gave() -> None:
    from frcnn_train.models.heads import to_unit_float

    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_unit_float(every), every.float().div_(255.0))
    assert torch.equal(to_unit_float(every), torch.from_numpy(every.numpy().astype("float32") / 255.0))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sizes", [[(128, 128), (128, 128)], [(128, 128), (64, 80)]])
def test_transform_takes_uint8_as_the_float_images_it_replaces(training: bool, sizes: list[tuple[int, int]]) -> None:
    """What the datasets give now (uint8, pixel-interleaved) and gave before (its float, same layout): the same
    normalised, resized batch, bitwise."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from frcnn_train.models.heads import SameSizeTransform

    g = torch.Generator().manual_seed(len(sizes) + training)
    uint8 = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1) for h, w in sizes]
    before = [image.float().div_(255.0) for image in uint8]
    ours = specialise(
        GeneralizedRCNNTransform(128, 128, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), SameSizeTransform
    ).train(training)
    for image, old in zip(uint8, before):
        assert torch.equal(ours.normalize(image), ours.normalize(old))
    batches = []
    for images in (uint8, before):
        torch.manual_seed(0)
        batches.append(ours(images)[0])
    assert torch.equal(batches[0].tensors, batches[1].tensors) and batches[0].image_sizes == batches[1].image_sizes


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_detector_trains_and_predicts_alike_from_uint8(compose_tiny, arch: str) -> None:
    cfg = compose_tiny(f"model={arch}")
    cfg.model.num_classes = 3
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    uint8 = [torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 64, 64, dtype=torch.uint8).index_fill_(1, torch.arange(6, 50), 1),
        }
        for _ in uint8
    ]
    runs = []
    for images in (uint8, [image.float().div_(255.0) for image in uint8]):
        fresh = copy.deepcopy(model)  # a training forward moves BatchNorm statistics
        torch.manual_seed(2)
        losses = fresh.train()(images, copy.deepcopy(targets))
        runs.append((losses, fresh.eval()(images)))
    (losses_a, out_a), (losses_b, out_b) = runs
    assert all(torch.equal(losses_a[k], losses_b[k]) for k in losses_a)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(out_a, out_b) for k in a)


def test_box_resize_and_normalisation_are_torchvisions_bitwise() -> None:
    """scale_boxes (ratios on the CPU) and the cached mean/std give torchvision's numbers to the bit."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

    from frcnn_train.models.heads import SameSizeTransform, scale_boxes

    g = torch.Generator().manual_seed(0)
    boxes = _random_boxes(500, 700, g)
    for original, new in [((480, 640), (800, 1066)), ((333, 517), (799, 1240)), ((96, 96), (64, 64)), ((7, 3), (1, 2))]:
        assert torch.equal(scale_boxes(boxes, original, new), resize_boxes(boxes, list(original), list(new)))
    stock = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ours = specialise(copy.deepcopy(stock), SameSizeTransform)
    for _ in range(2):  # the second call takes the cached mean and std
        image = torch.rand(3, 37, 41, generator=g)
        assert torch.equal(ours.normalize(image), stock.normalize(image))
    assert "_mean_std_cache" not in str(ours.state_dict().keys())
