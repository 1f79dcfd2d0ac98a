"""CUDA-graph replays of the prompt path against the eager path they record."""

from __future__ import annotations

import functools

import pytest
import torch

from samkit.graphs import MAX_GRAPH_BATCH, MAX_GRAPHS, GraphCache, PromptInputs, run_prompts
from samkit.predictor import SamPredictor

from images import photo
from reference import TINY, random_sam

INPUT_SIZE, ORIGINAL_SIZE = (120, 160), (90, 120)  # TINY: 160 input, 10x10 map


def prompt_graphs(model):
    return GraphCache(
        functools.partial(run_prompts, model), max_batch=MAX_GRAPH_BATCH, max_graphs=MAX_GRAPHS
    )


def _points(batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(batch, 2, 2, generator=g) * 150).to(device)
    labels = torch.tensor([[1, 0]] * batch, dtype=torch.int, device=device)
    return PromptInputs(coords, labels, None, None)


def test_no_graph_on_the_cpu():
    model = random_sam(TINY)
    features = torch.randn(1, 32, 10, 10)
    graphs = prompt_graphs(model)
    args = (True, INPUT_SIZE, ORIGINAL_SIZE, False)
    assert graphs._layout(features, None, _points(1, "cpu"), args) is None
    with torch.inference_mode():
        out = graphs(features, None, _points(2, "cpu"), True, INPUT_SIZE, ORIGINAL_SIZE, False)
    assert out.masks.shape == (2, 3, *ORIGINAL_SIZE) and out.masks.dtype == torch.bool
    assert not graphs._graphs


def _eager(model, features, side, prompts, *args):
    return run_prompts(model, features, side, prompts, *args)


def _assert_same(got, want):
    # the replay runs the recorded kernels on the same values: identical up to nothing, but
    # compared with a (tiny) tolerance rather than float equality
    for g, w in zip(got, want, strict=True):
        if g.dtype == torch.bool:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replays_equal_the_eager_path_across_images_and_layouts():
    model = random_sam(TINY).cuda()
    graphs = prompt_graphs(model)
    with torch.inference_mode():
        images = [torch.randn(1, 32, 10, 10, device="cuda") for _ in range(2)]
        sides = [model.prepare_decode(f) for f in images]
        box = PromptInputs(None, None, torch.tensor([[4.0, 6.0, 30.0, 40.0]], device="cuda"), None)
        mask = torch.randn(1, 1, 40, 40, device="cuda")
        with_mask = _points(1, "cuda", seed=5)._replace(mask_input=mask)
        cases = [(_points(1, "cuda", seed=s), True, False) for s in range(3)] + [
            (box, False, True),
            (_points(3, "cuda"), True, True),
        ]
        for features, side in zip(images, sides, strict=True):
            for prompts, multimask, logits in cases:
                args = (multimask, INPUT_SIZE, ORIGINAL_SIZE, logits)
                for _ in range(3):  # eager, recorded, replayed
                    _assert_same(
                        graphs(features, side, prompts, *args),
                        _eager(model, features, side, prompts, *args),
                    )
            args = (True, INPUT_SIZE, ORIGINAL_SIZE, False)
            for _ in range(3):
                _assert_same(
                    graphs(features, None, with_mask, *args),
                    _eager(model, features, None, with_mask, *args),
                )
        assert graphs._graphs  # some layouts were replayed
        big = _points(MAX_GRAPH_BATCH + 1, "cuda")
        args = (True, INPUT_SIZE, ORIGINAL_SIZE, False)
        assert graphs._layout(images[0], sides[0], big, args) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replay_results_are_not_overwritten_by_the_next_replay():
    model = random_sam(TINY).cuda()
    graphs = prompt_graphs(model)
    args = (True, INPUT_SIZE, ORIGINAL_SIZE, True)
    with torch.inference_mode():
        features = torch.randn(1, 32, 10, 10, device="cuda")
        side = model.prepare_decode(features)
        first = [graphs(features, side, _points(1, "cuda", seed=1), *args) for _ in range(3)]
        graphs(features, side, _points(1, "cuda", seed=2), *args)
        want = _eager(model, features, side, _points(1, "cuda", seed=1), *args)
    for out in first:
        _assert_same(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segment_everything_token_graphs_equal_the_eager_decoder():
    predictor = SamPredictor(random_sam(TINY).cuda())
    with torch.inference_mode():
        predictor.set_image(photo(90, 120, seed=4))
        features = predictor.features
        side = predictor._prepared(features, None)
        previous = None
        # eager, then two graphs recorded (two buffers), then each replayed twice
        for seed in range(6):
            coords = _points(16, "cuda", seed=seed).point_coords[:, :1].double()
            labels = torch.ones(16, 1, dtype=torch.int, device="cuda")
            got = predictor._decode_tokens(features, coords, labels, None, None, True)
            want = predictor._run_decode_tokens(features, side, (coords, labels, None, None), True)
            _assert_same(got[:3], want[:3])
            assert got.mask_ids == want.mask_ids and got.size == want.size
            if previous is not None:
                # the generator reads batch i after batch i+1 was queued: the replay into the
                # other buffer must leave it alone (results are returned without a copy)
                _assert_same(previous[0][:3], previous[1][:3])
            previous = (got, want)
        assert [len(g) for g in predictor._token_graphs._graphs.values()] == [2]
