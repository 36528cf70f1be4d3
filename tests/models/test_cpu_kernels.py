"""models/roi_align.py and models/max_pool.py: torchvision's and PyTorch's values and gradients, faster on the CPU."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from frcnn_train.models import roi_align as ra
from frcnn_train.models.roi_align import MatmulMultiScaleRoIAlign

IMAGE_SHAPES = [(128, 112), (96, 128), (128, 128)]


def _inputs(seed: int, channels: int = 16) -> tuple[OrderedDict, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    features = OrderedDict(
        (name, torch.randn(len(IMAGE_SHAPES), channels, 32 // 2**i, 32 // 2**i, generator=g, requires_grad=True))
        for i, name in enumerate("0123")
    )
    boxes = []
    for n in (40, 0, 25):  # the middle image has no boxes
        xy = torch.rand(n, 2, generator=g) * 150 - 15  # some boxes stick out of the image
        wh = torch.rand(n, 2, generator=g) ** 2 * 120
        wh[:3] = torch.rand(min(n, 3), 2, generator=g) * 0.5  # below one feature pixel
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    boxes[2][-5:] = torch.tensor([[0.0, 0.0, 128.0, 128.0]]).expand(5, 4) * 0.999  # whole image: the border rule
    return features, boxes


def _both(output_size: int) -> tuple[MultiScaleRoIAlign, MatmulMultiScaleRoIAlign]:
    return (MultiScaleRoIAlign(list("0123"), output_size, 2), MatmulMultiScaleRoIAlign(list("0123"), output_size, 2))


@pytest.mark.parametrize("output_size", [7, 14])  # the box head's and the mask head's
def test_values_and_gradients_equal_torchvision(output_size: int) -> None:
    stock, ours = _both(output_size)
    features, boxes = _inputs(output_size)
    want, got = stock(features, boxes, IMAGE_SHAPES), ours(features, boxes, IMAGE_SHAPES)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, list(features.values()), upstream, materialize_grads=True)
    got_grads = torch.autograd.grad(got, list(features.values()), upstream, materialize_grads=True)
    for w, o in zip(want_grads, got_grads):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-4)
    assert any(bool(w.abs().sum() > 0) for w in want_grads[1:]), "rois reach more than one level"


def test_rois_in_any_order_and_single_roi_align() -> None:
    """roi_align_matmul on its own: rois not grouped by image, as torchvision.ops.roi_align takes them."""
    from torchvision.ops import roi_align

    features, boxes = _inputs(3)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    rois = rois[torch.randperm(len(rois), generator=torch.Generator().manual_seed(0))]
    level = features["0"]
    torch.testing.assert_close(
        ra.roi_align_matmul(level, rois, (7, 7), 0.25, 2), roi_align(level, rois, (7, 7), 0.25, 2), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("cap", [0, 7 * 16 * 32 * 9])  # one roi per chunk; 9 rois of the largest level
def test_over_the_cap_the_cpu_pools_in_chunks_not_with_torchvision(monkeypatch: pytest.MonkeyPatch, cap: int) -> None:
    """More rois than MAX_INTERMEDIATE holds (512 per image at 128 px) go in chunks: torchvision's op,
    whose CPU backward took half of such a step, is never called, and values and gradients still match it."""
    stock, ours = _both(7)
    features, boxes = _inputs(5)
    want = stock(features, boxes, IMAGE_SHAPES)
    monkeypatch.setattr(ra, "MAX_INTERMEDIATE", cap)
    chunks = []
    matmul = ra.roi_align_matmul
    monkeypatch.setattr(ra, "roi_align_matmul", lambda *a, **k: chunks.append(k["chunk"]) or matmul(*a, **k))
    monkeypatch.setattr(torch.ops.torchvision, "roi_align", None)  # any call to torchvision's kernel fails
    got = ours(features, boxes, IMAGE_SHAPES)
    assert chunks and min(chunks) == max(1, cap // (7 * 16 * 32)) < 40  # the largest level: fewer than its rois
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(want)
    for w, o in zip(
        *(torch.autograd.grad(y, list(features.values()), upstream, materialize_grads=True) for y in (want, got))
    ):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-4)


def test_under_the_cap_the_cpu_result_is_one_product_per_image() -> None:
    """The sizes that already pooled with the products before chunking existed keep their exact numbers."""
    _, ours = _both(7)
    features, boxes = _inputs(5)
    level = features["0"]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    one_product = ra.roi_align_matmul(level, rois, (7, 7), 0.25, 2)  # chunk=None: an image's rois at once
    ours.scales, ours.map_levels = [0.25], lambda _: torch.zeros(len(rois), dtype=torch.int64)
    got = ours({"0": level}, boxes, IMAGE_SHAPES)
    upstream = torch.randn_like(got)
    assert torch.equal(got, one_product)
    # The gradient sums over an image's rois: in chunks it would add in another order.
    assert torch.equal(*(torch.autograd.grad(y, level, upstream)[0] for y in (got, one_product)))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_rois_in_chunks_give_the_same_values_and_gradients(chunk: int) -> None:
    """On CUDA (deterministic mode) an image's rois go to the products in chunks; here on the CPU."""
    features, boxes = _inputs(11)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    level = features["0"]
    whole = ra.roi_align_matmul(level, rois, (7, 7), 0.25, 2)
    parts = ra.roi_align_matmul(level, rois, (7, 7), 0.25, 2, chunk=chunk)
    # Products of another shape may take another BLAS kernel (chunk=1: a matrix-vector one) that sums in another
    # order: a few ulp, which used up to 26% of 1e-6 here (1 and 2 threads); 1e-5 leaves a margin of 40 on hosts
    # whose kernels differ, and a chunking error would still be of the order of the values.
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(whole)
    (want,), (got,) = (torch.autograd.grad(out, [level], upstream) for out in (whole, parts))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_products_pool_on_the_cpu_and_on_cuda_only_in_deterministic_mode() -> None:
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for on in (False, True):
            torch.use_deterministic_algorithms(on, warn_only=True)
            assert ra.pools_with_matmul(torch.device("cpu"))
            assert ra.pools_with_matmul(torch.device("cuda")) is on
    finally:
        torch.use_deterministic_algorithms(was, warn_only=True)


def test_no_boxes_and_autocast_dtype() -> None:
    stock, ours = _both(7)
    features, _ = _inputs(7)
    empty = [torch.zeros(0, 4)] * len(IMAGE_SHAPES)
    assert ours(features, empty, IMAGE_SHAPES).shape == stock(features, empty, IMAGE_SHAPES).shape == (0, 16, 7, 7)
    _, boxes = _inputs(8)
    half = OrderedDict((k, v.detach().bfloat16()) for k, v in features.items())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = stock(half, boxes, IMAGE_SHAPES), ours(half, boxes, IMAGE_SHAPES)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_the_builder_uses_it() -> None:
    from frcnn_train.config import compose_config
    from frcnn_train.models import build_model

    cfg = compose_config(["model=mask_rcnn", "model.num_classes=3"])
    model = build_model(cfg.model)
    assert isinstance(model.roi_heads.box_roi_pool, MatmulMultiScaleRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, MatmulMultiScaleRoIAlign)


@pytest.mark.parametrize("shape", [(2, 8, 17, 16), (3, 4, 9, 12)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_stem_max_pool_is_bitwise_max_pool(shape: tuple[int, ...], ceil_mode: bool) -> None:
    """After a ReLU most windows hold ties (zeros): the same element must win, so gradients match bitwise."""
    from torch import nn

    from frcnn_train.models.max_pool import CpuMaxPool2d

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.relu(torch.randn(shape, generator=g)).requires_grad_()
    stock, ours = nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode), CpuMaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
    want, got = stock(x), ours(x)
    assert torch.equal(got, want) and got.is_contiguous()
    upstream = torch.randn(want.shape, generator=g)
    assert torch.equal(*(torch.autograd.grad(y, x, upstream)[0] for y in (got, want)))
    with torch.no_grad():
        assert torch.equal(ours(x), want)


def test_resnet_backbones_use_it() -> None:
    from frcnn_train.config import compose_config
    from frcnn_train.models import build_model
    from frcnn_train.models.max_pool import CpuMaxPool2d

    model = build_model(compose_config(["model.num_classes=3"]).model)
    assert isinstance(model.backbone.body.maxpool, CpuMaxPool2d)
