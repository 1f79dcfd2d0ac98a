"""SamPredictor: parity with transformers at full vit_b, API equivalences, extensions.
(Bad inputs: test_predictor_validation.py.)

Tolerances (fp32): max |ours - reference| <= 1e-4 x max |reference| against transformers (a
different implementation); 1e-5 x scale where the same code runs batched vs one by one. Bool
masks are compared where the logits are clear of the 0 threshold by more than that tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from samkit import SamPredictor
from samkit.checkpoint import save_checkpoint
from samkit.config import VARIANTS
from samkit.embedding import EmbeddingError, EmbeddingMismatchError
from samkit.prompts import ObjectPrompts
from samkit.transforms import ResizeLongestSide

from images import photo
from reference import TINY, assert_close_scaled, hf_reference, random_sam

# the official pixel normalisation and input side, written out independently of samkit
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
SIDE = 1024


def assert_masks_agree(masks: np.ndarray, logits: np.ndarray, rel: float = 1e-5) -> None:
    """Bool masks equal `logits > 0` wherever the logits are clearly away from 0."""
    clear = np.abs(logits) > rel * np.abs(logits).max()
    np.testing.assert_array_equal(masks[clear], logits[clear] > 0)


def close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    assert_close_scaled(torch.as_tensor(actual), torch.as_tensor(expected), rel=rel)


# -- parity with transformers at full size --------------------------------------------------


@pytest.fixture(scope="module")
def vit_b():
    sam = random_sam(VARIANTS["vit_b"], seed=0)
    return SamPredictor(sam), hf_reference(VARIANTS["vit_b"], sam.state_dict())


def official_pixels(image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """The official recipe: PIL bilinear resize of the long side to 1024, normalise, zero-pad."""
    h, w = image.shape[:2]
    scale = SIDE / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded = np.zeros((SIDE, SIDE, 3), dtype=np.float32)
    padded[:new_h, :new_w] = (np.asarray(resized, dtype=np.float32) - MEAN) / STD
    return torch.from_numpy(padded).permute(2, 0, 1)[None], (new_h, new_w)


def official_upsample(low_res: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]):
    """Low-res logits -> 1024 -> crop to the resized image -> the original size (bilinear)."""
    masks = F.interpolate(low_res, (SIDE, SIDE), mode="bilinear", align_corners=False)
    masks = masks[..., : resized[0], : resized[1]]
    return F.interpolate(masks, original, mode="bilinear", align_corners=False)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(400, 400), (300, 450)], ids=["square", "landscape"])
def test_parity_with_transformers_full_vit_b(vit_b, shape):
    predictor, hf = vit_b
    image = photo(*shape, seed=1)
    h, w = shape
    pixels, resized = official_pixels(image)
    scale = torch.tensor([resized[1] / w, resized[0] / h])
    with torch.no_grad():
        hf_embedding = hf.get_image_embeddings(pixels)
    predictor.set_image(image)
    assert predictor.input_size == resized and predictor.original_size == shape
    assert_close_scaled(predictor.features, hf_embedding)

    point = np.array([[0.3 * w, 0.4 * h]])
    points = np.array([[0.3 * w, 0.4 * h], [0.75 * w, 0.6 * h], [0.5 * w, 0.25 * h]])
    box = np.array([0.5 * w, 0.4 * h, 0.95 * w, 0.9 * h])
    mask = np.random.default_rng(2).normal(0, 5, (1, 256, 256)).astype(np.float32)
    cases = [
        (dict(point_coords=point, point_labels=np.array([1])), True),
        (dict(point_coords=points, point_labels=np.array([1, 0, 1]), box=box), False),
        (dict(box=box), True),
        (dict(point_coords=point, point_labels=np.array([1]), mask_input=mask), False),
    ]
    for prompt, multimask in cases:
        logits, scores, low_res = predictor.predict(
            **prompt, multimask_output=multimask, return_logits=True
        )
        hf_inputs = {}
        if "point_coords" in prompt:
            coords = torch.as_tensor(prompt["point_coords"], dtype=torch.float32) * scale
            hf_inputs["input_points"] = coords[None, None]
            hf_inputs["input_labels"] = torch.as_tensor(prompt["point_labels"])[None, None]
        if "box" in prompt:
            corners = torch.as_tensor(prompt["box"], dtype=torch.float32).view(2, 2) * scale
            hf_inputs["input_boxes"] = corners.view(1, 1, 4)
        if "mask_input" in prompt:
            hf_inputs["input_masks"] = torch.as_tensor(prompt["mask_input"])[None]
        with torch.no_grad():
            out = hf(image_embeddings=hf_embedding, multimask_output=multimask, **hf_inputs)
        expected_low = out.pred_masks[0]  # 1 x C x 256 x 256
        assert_close_scaled(torch.as_tensor(low_res)[None], expected_low)
        assert_close_scaled(torch.as_tensor(scores), out.iou_scores[0, 0])
        expected = official_upsample(expected_low, resized, shape)[0]
        assert_close_scaled(torch.as_tensor(logits), expected)
        masks, _, _ = predictor.predict(**prompt, multimask_output=multimask)
        assert_masks_agree(masks, expected.numpy(), rel=1e-4)


# -- tiny model: the API --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam():
    return random_sam(TINY, seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return photo(90, 130, seed=0)


@pytest.fixture
def predictor(sam, image) -> SamPredictor:
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return predictor


def test_official_attributes_and_outputs(sam, image):
    predictor = SamPredictor(sam)
    assert predictor.model is sam and not predictor.is_image_set
    assert isinstance(predictor.transform, ResizeLongestSide)
    assert predictor.device == torch.device("cpu")
    predictor.set_image(image)
    assert predictor.is_image_set
    assert predictor.original_size == (90, 130) and predictor.input_size == (111, 160)
    assert predictor.get_image_embedding().shape == (1, 32, 10, 10)
    masks, scores, low_res = predictor.predict(np.array([[30, 40]]), np.array([1]))
    assert masks.shape == (3, 90, 130) and masks.dtype == np.bool_
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert low_res.shape == (3, 40, 40) and low_res.dtype == np.float32
    box = np.array([5, 5, 60, 70])
    logits, _, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
    assert logits.shape == (1, 90, 130) and logits.dtype == np.float32
    predictor.reset_image()
    assert not predictor.is_image_set and predictor.features is None


def test_bgr_is_flipped_rgb(sam, image):
    rgb, bgr = SamPredictor(sam), SamPredictor(sam)
    rgb.set_image(image)
    bgr.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    assert torch.equal(rgb.features, bgr.features)


def test_set_torch_image_equals_set_image(sam, image):
    a, b = SamPredictor(sam), SamPredictor(sam)
    a.set_image(image)
    resized = torch.as_tensor(b.transform.apply_image(image).copy()).permute(2, 0, 1)[None]
    b.set_torch_image(resized, image.shape[:2])
    assert torch.equal(a.features, b.features) and a.input_size == b.input_size


def test_predict_is_inference_only_and_model_stays_differentiable(predictor):
    assert not predictor.features.is_inference()  # encoded under no_grad: reusable in autograd
    masks, iou, _ = predictor.predict_torch(torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]]))
    assert masks.is_inference() and iou.is_inference()
    low_res, _ = predictor.model.decode(
        predictor.features, torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])
    )
    assert low_res.requires_grad


def test_predict_matches_predict_torch(predictor):
    coords = np.array([[30.0, 40.0], [100.0, 20.0]])
    labels = np.array([1, 0])
    box = np.array([10.0, 5.0, 120.0, 80.0])
    size = predictor.original_size
    t = predictor.transform
    for multimask in (True, False):
        logits, scores, low_res = predictor.predict(coords, labels, box, None, multimask, True)
        masks, _, _ = predictor.predict(coords, labels, box, None, multimask)
        t_logits, t_scores, t_low = predictor.predict_torch(
            t.apply_coords_torch(torch.as_tensor(coords), size)[None],
            torch.as_tensor(labels)[None],
            t.apply_boxes_torch(torch.as_tensor(box), size)[None],
            multimask_output=multimask,
            return_logits=True,
        )
        close(logits, t_logits[0].numpy())
        close(scores, t_scores[0].numpy())
        close(low_res, t_low[0].numpy())
        assert_masks_agree(masks, t_logits[0].numpy())


def test_predict_torch_batch_equals_one_by_one(predictor):
    coords = torch.tensor([[[20.0, 30.0]], [[100.0, 60.0]], [[150.0, 10.0]]])
    labels = torch.tensor([[1], [1], [0]])
    boxes = torch.tensor([[0.0, 0.0, 80.0, 90.0], [50.0, 20.0, 150.0, 100.0], [5, 5, 40, 40]])
    masks, iou, low = predictor.predict_torch(coords, labels, boxes, return_logits=True)
    assert masks.shape == (3, 3, 90, 130) and iou.shape == (3, 3) and low.shape == (3, 3, 40, 40)
    for i in range(3):
        one, one_iou, _ = predictor.predict_torch(
            coords[i : i + 1], labels[i : i + 1], boxes[i : i + 1], return_logits=True
        )
        close(masks[i], one[0])
        close(iou[i], one_iou[0])


# -- extensions -----------------------------------------------------------------------------


def test_objects_equal_one_at_a_time(predictor):
    mask = predictor.predict(np.array([[60, 50]]), np.array([1]))[2][:1]  # 1 x 40 x 40
    objects = [
        dict(point_coords=np.array([[30, 40]]), point_labels=np.array([1])),
        dict(point_coords=[[10, 10], [50, 50]], point_labels=[1, 0], box=[5, 5, 60, 70]),
        dict(box=np.array([40, 20, 120, 85])),
        dict(point_coords=np.array([[100, 60]]), point_labels=np.array([0])),
        dict(point_coords=np.array([[70, 30]]), point_labels=np.array([1]), mask_input=mask),
    ]
    logits, scores, low_res = predictor.predict_objects(
        point_coords=[o.get("point_coords") for o in objects],
        point_labels=[o.get("point_labels") for o in objects],
        boxes=[o.get("box") for o in objects],
        mask_inputs=[o.get("mask_input") for o in objects],
        return_logits=True,
    )
    masks, _, _ = predictor.predict_objects(
        [o.get("point_coords") for o in objects],
        [o.get("point_labels") for o in objects],
        [o.get("box") for o in objects],
        [o.get("mask_input") for o in objects],
    )
    assert logits.shape == (5, 3, 90, 130) and scores.shape == (5, 3) and masks.dtype == bool
    for k, prompt in enumerate(objects):
        one_logits, one_scores, one_low = predictor.predict(**prompt, return_logits=True)
        close(logits[k], one_logits)
        close(scores[k], one_scores)
        close(low_res[k], one_low)
        assert_masks_agree(masks[k], one_logits)


def test_objects_as_padded_arrays(predictor):
    coords = np.array([[[30, 40], [0, 0]], [[10, 10], [50, 50]]], dtype=float)
    labels = np.array([[1, -1], [1, 0]])
    boxes = np.array([[5, 5, 60, 70], [40, 20, 120, 85]])
    logits, _, _ = predictor.predict_objects(coords, labels, boxes, return_logits=True)
    for k in range(2):
        one, _, _ = predictor.predict(coords[k], labels[k], boxes[k], return_logits=True)
        close(logits[k], one)


def test_no_objects_give_empty_arrays_shaped_like_one_objects(predictor):
    """A list of zero objects (a batch that happens to be empty) is not an error: the arrays
    have 0 rows and the shapes and dtypes that one object's arrays have."""
    for multimask in (True, False):
        for logits in (True, False):
            empty = predictor.predict_objects(
                [], [], multimask_output=multimask, return_logits=logits
            )
            one = predictor.predict_objects(
                [[[30, 40]]], [[1]], multimask_output=multimask, return_logits=logits
            )
            for e, o in zip(empty, one, strict=True):
                assert e.shape == (0, *o.shape[1:]) and e.dtype == o.dtype


def test_padding_tokens_change_masks_which_is_why_objects_are_grouped(predictor):
    alone, _, _ = predictor.predict(np.array([[30, 40]]), np.array([1]), return_logits=True)
    padded, _, _ = predictor.predict(
        np.array([[30, 40], [0, 0]]), np.array([1, -1]), return_logits=True
    )
    assert np.abs(alone - padded).max() > 1e-3 * np.abs(alone).max()


def test_predict_batch_equals_one_by_one(sam):
    images = [photo(90, 130, seed=3), photo(120, 80, seed=4), photo(64, 64, seed=5)]
    prompts = [
        ObjectPrompts(point_coords=[[[30, 40]], [[10, 10], [60, 20]]], point_labels=[[1], [1, 0]]),
        {"boxes": [[5, 5, 60, 100]]},
        ObjectPrompts(point_coords=[[[30, 30]]], point_labels=[[1]], boxes=[[10, 10, 50, 50]]),
    ]
    batched = SamPredictor(sam)
    results = batched.predict_batch(images, prompts, return_logits=True)
    assert not batched.is_image_set  # the current image is left alone
    single = SamPredictor(sam)
    for image, prompt, (logits, scores, low_res) in zip(images, prompts, results, strict=True):
        single.set_image(image)
        fields = prompt if isinstance(prompt, dict) else dataclasses.asdict(prompt)
        expected = single.predict_objects(**fields, return_logits=True)
        assert logits.shape[2:] == image.shape[:2]
        close(logits, expected[0])
        close(scores, expected[1])
        close(low_res, expected[2])


def test_encode_images_one_pass_equals_set_image(sam):
    images = [photo(90, 130, seed=3), photo(120, 80, seed=4)]
    predictor = SamPredictor(sam)
    embeddings = predictor.encode_images(images)
    for image, embedding in zip(images, embeddings, strict=True):
        predictor.set_image(image)
        assert_close_scaled(embedding.features, predictor.features, rel=1e-5)
        assert embedding.original_size == predictor.original_size
        assert embedding.input_size == predictor.input_size
        assert embedding.image_digest == predictor.image_digest


def test_embedding_round_trip(predictor, sam, image, tmp_path):
    path = tmp_path / "image.safetensors"
    predictor.save_embedding(path)
    expected = predictor.predict(np.array([[30, 40]]), np.array([1]), return_logits=True)
    fresh = SamPredictor(sam)
    fresh.load_embedding(path, image=image)
    assert fresh.is_image_set and fresh.original_size == (90, 130)
    assert fresh.input_size == predictor.input_size
    got = fresh.predict(np.array([[30, 40]]), np.array([1]), return_logits=True)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)  # same tensors, same code: bit-identical
    # the same weights in bf16 are the same checkpoint
    SamPredictor(random_sam(TINY, seed=0).to(torch.bfloat16)).load_embedding(path)


def test_embedding_refused_for_another_model_or_image(predictor, tmp_path):
    path = tmp_path / "image.safetensors"
    predictor.save_embedding(path)
    deeper = dataclasses.replace(
        TINY, image_encoder=dataclasses.replace(TINY.image_encoder, depth=4)
    )
    with pytest.raises(EmbeddingMismatchError, match=r"computed by a custom model .*depth 3"):
        SamPredictor(random_sam(deeper)).load_embedding(path)
    with pytest.raises(EmbeddingMismatchError, match="weights differ"):
        SamPredictor(random_sam(TINY, seed=1)).load_embedding(path)
    with pytest.raises(EmbeddingMismatchError, match="another image"):
        predictor.load_embedding(path, image=photo(90, 130, seed=9))
    other = tmp_path / "not_an_embedding.safetensors"
    other.write_bytes(b"hello, this is text")
    with pytest.raises(EmbeddingError, match="not a samkit embedding file"):
        predictor.load_embedding(other)
    with pytest.raises(EmbeddingError, match="no such file"):
        predictor.load_embedding(tmp_path / "missing.safetensors")


def test_from_checkpoint_with_auto_device(tmp_path, image):
    path = save_checkpoint(random_sam(TINY).state_dict(), tmp_path / "tiny.pth", "official")
    predictor = SamPredictor.from_checkpoint(path)  # model_type="auto", device="auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and torch.backends.mps.is_available():
        expected = "mps"
    assert predictor.device.type == expected
    predictor.set_image(image)
    assert predictor.predict(np.array([[3, 4]]), np.array([1]))[0].shape == (3, 90, 130)
