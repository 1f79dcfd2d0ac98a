"""SamPredictor prompt and image validation: each bad input gets a ValueError (or the official
RuntimeError before set_image) naming the argument, what was expected and what came."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit import SamPredictor

from images import photo
from reference import TINY, random_sam


@pytest.fixture(scope="module")
def sam():
    return random_sam(TINY, seed=0)


@pytest.fixture(scope="module")
def predictor(sam) -> SamPredictor:
    predictor = SamPredictor(sam)
    predictor.set_image(photo(90, 130, seed=0))
    return predictor


P1 = np.array([[30.0, 40.0]])
BAD_PREDICT = [
    (dict(point_coords=P1, point_labels=np.array([1, 0])), r"point_labels: expected shape \(1,\)"),
    (dict(point_coords=P1), "point_labels must be given with point_coords"),
    (dict(point_labels=np.array([1])), "point_coords must be given with point_labels"),
    (dict(point_coords=np.array([30, 40]), point_labels=[1]), r"expected shape \(N, 2\).*\(2,\)"),
    (dict(point_coords=P1, point_labels=np.array([2])), r"labels 1 \(foreground\).*got 2 at"),
    (dict(point_coords=P1, point_labels=np.array([0.5])), "got 0.5 at index 0"),
    (dict(point_coords=[[30, np.nan]], point_labels=[1]), r"point_coords: .*finite.*got nan"),
    (dict(point_coords=[[np.inf, 1]], point_labels=[1]), r"point_coords: .*finite.*got inf"),
    (dict(box=np.array([10, 0, 5, 20])), r"box: expected XYXY with x0 <= x1 .*\[10, 0, 5, 20\]"),
    (dict(box=np.array([0, 30, 5, 20])), r"y0 <= y1, got \[0, 30, 5, 20\]"),
    (dict(box=np.array([0, np.nan, 5, 20])), "box: expected finite numbers, got nan"),
    (dict(box=np.array([0, 1, 5])), r"box: expected shape \(4,\) XYXY, got \(3,\)"),
    (dict(mask_input=np.zeros((40, 40))), r"mask_input: expected shape \(1, 40, 40\).*\(40, 40\)"),
    (dict(mask_input=np.full((1, 40, 40), np.inf)), "mask_input: expected finite numbers"),
    (dict(point_coords=[["a", 1]], point_labels=[1]), "point_coords: expected an array of num"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_PREDICT)
def test_predict_rejects(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


Z3 = torch.zeros(3, 4)
BAD_TORCH = [
    (dict(point_coords=torch.zeros(1, 2), point_labels=torch.ones(1, 2)), r"\(B, N, 2\)"),
    (dict(point_coords=torch.zeros(1, 2, 2), point_labels=torch.ones(1, 3)), r"\(1, 2\) as"),
    (dict(point_coords=torch.zeros(1, 1, 2), point_labels=torch.tensor([[3]])), "got 3 at"),
    (dict(point_coords=torch.full((1, 1, 2), torch.nan), point_labels=torch.ones(1, 1)), "nan"),
    (dict(boxes=torch.tensor([[5.0, 0, 1, 1]])), r"x0 <= x1 and y0 <= y1, got \[5, 0, 1, 1\]"),
    (dict(boxes=torch.tensor([[0, 0, 1, 1], [0, 5.0, 1, 1]])), "at index 1"),
    (dict(boxes=torch.zeros(2, 5)), r"boxes: expected shape \(B, 4\)"),
    (dict(mask_input=torch.zeros(1, 40, 40)), r"mask_input: expected shape \(B, 1, 40, 40\)"),
    (
        dict(point_coords=torch.zeros(2, 1, 2), point_labels=torch.ones(2, 1), boxes=Z3),
        "batch sizes differ.*point_coords 2, boxes 3",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_TORCH)
def test_predict_torch_rejects(predictor, kwargs, message):
    kwargs = {"point_coords": None, "point_labels": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        predictor.predict_torch(**kwargs)


BAD_OBJECTS = [
    (dict(point_coords=[[[1, 2]], [[3, 4]]], point_labels=[[1]]), "point_labels: expected 2 ent"),
    (dict(point_coords=[[[1, 2]]], point_labels=[[1, 1]]), r"point_labels\[0\]: expected shape"),
    (dict(boxes=[[0, 0, 5, 5], [9, 0, 5, 5]]), r"boxes\[1\]: expected XYXY"),
    (dict(boxes=[None, [0, 0, 5, 5]]), "object 0: expected at least one prompt"),
    (dict(), "expected prompts for at least one object"),
    (dict(mask_inputs=[np.zeros((1, 8, 8))]), r"mask_inputs\[0\]: expected shape \(1, 40, 40\)"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_OBJECTS)
def test_predict_objects_rejects(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict_objects(**kwargs)


def test_predict_batch_rejects_before_encoding(sam):
    predictor = SamPredictor(sam)
    with pytest.raises(ValueError, match=r"prompts: expected one entry per image \(2 images\)"):
        predictor.predict_batch([photo(20, 20), photo(20, 20)], [{"boxes": [[0, 0, 5, 5]]}])
    with pytest.raises(ValueError, match=r"prompts\[0\]: unknown keys \['box'\]"):
        predictor.predict_batch([photo(20, 20)], [{"box": [0, 0, 5, 5]}])


def test_points_outside_the_image_are_accepted(predictor):
    masks, _, _ = predictor.predict(np.array([[-50.0, 400.0]]), np.array([1]))
    assert masks.shape == (3, 90, 130)


def test_predict_before_set_image(sam):
    predictor = SamPredictor(sam)
    with pytest.raises(RuntimeError, match=r"An image must be set with \.set_image\(\.\.\.\)"):
        predictor.predict(P1, np.array([1]))
    with pytest.raises(RuntimeError, match="An image must be set"):
        predictor.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match="An image must be set"):
        predictor.predict_objects(boxes=[[0, 0, 5, 5]])
    with pytest.raises(RuntimeError, match="to generate an embedding"):
        predictor.get_image_embedding()


def test_bad_images(sam):
    predictor = SamPredictor(sam)
    with pytest.raises(ValueError, match=r"image: expected an HxWx3 array.*got shape \(20, 20\)"):
        predictor.set_image(np.zeros((20, 20), np.uint8))
    with pytest.raises(ValueError, match=r"image: expected dtype uint8.*float64"):
        predictor.set_image(np.zeros((20, 20, 3)))
    with pytest.raises(ValueError, match="image_format: expected 'RGB' or 'BGR', got 'HSV'"):
        predictor.set_image(np.zeros((20, 20, 3), np.uint8), image_format="HSV")
    with pytest.raises(ValueError, match=r"transformed_image: expected shape \(B, 3, h, w\)"):
        predictor.set_torch_image(torch.zeros(1, 3, 50, 50), (50, 50))
