"""cscompile.stream: per-layer statistics with one decoder layer resident at a time equal the
in-memory passes bit for bit."""
import numpy as np
import pytest
import torch

from cscompile.frontend import analyze, load_model
from cscompile.passes.route import default_layer, router_features
from cscompile.passes.signature import prompt_signatures
from cscompile.stream import LayerStream, streamed_statistics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 500, (1, n), generator=g) for n in (5, 17, 9, 30)]


def test_streamed_statistics_equal_the_in_memory_passes(stories_dir):
    loaded = load_model(stories_dir)
    smap = analyze(loaded)
    layer = default_layer(smap)
    done = []
    sig, pooled = streamed_statistics(stories_dir, smap, _prompts(), layer,
                                      on_layer_done=done.append)
    assert done == list(range(smap.n_layers))
    ref = prompt_signatures(loaded.model, smap, _prompts())
    assert ref.std() > 0 and np.array_equal(sig, ref)
    assert torch.equal(pooled, router_features(loaded.model, smap, _prompts(), layer))


def test_at_most_one_layer_is_resident(stories_dir):
    stream = LayerStream(stories_dir)
    resident = []

    def on_layer(li, layer):
        resident.append([i for i, m in enumerate(stream.layers)
                         if next(m.parameters()).device.type != "meta"])
        return []

    stream.flow(_prompts()[:2], on_layer)
    assert resident == [[li] for li in range(stream.n_layers)]
    assert all(next(m.parameters()).is_meta for m in stream.layers)  # all freed again
