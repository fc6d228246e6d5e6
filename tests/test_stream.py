"""cscompile.stream: a model whose decoder layers are read from safetensors one at a time
computes, analyses and writes exactly what the loaded model does; bad uses are one line."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from cscompile.bundle import StreamedTensors
from cscompile.errors import UnsupportedModelError, UserInputError
from cscompile.frontend import analyze, load_model, weight_hash
from cscompile.stream import open_streamed, resident, state_items, stream_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STREAMABLE = ("llama", "qwen2", "gemma2", "gemma3_text")  # model.model.layers stacks


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 100, (1, n), generator=g) for n in (5, 17, 9)]


@pytest.fixture(scope="module")
def tiny_dirs(tiny, tmp_path_factory):
    """Each streamable tiny architecture saved as a Hugging Face safetensors directory."""
    out = {}
    for arch in STREAMABLE + ("gpt2",):
        d = tmp_path_factory.mktemp(arch)
        tiny(arch)[0].model.save_pretrained(d)
        out[arch] = d
    return out


@pytest.mark.parametrize("arch", STREAMABLE)
def test_a_streamed_model_computes_and_holds_what_the_loaded_model_does(arch, tiny_dirs):
    ref = load_model(tiny_dirs[arch]).model
    model = open_streamed(tiny_dirs[arch])
    with torch.no_grad():
        for ids in _prompts():
            assert torch.equal(model(input_ids=ids, use_cache=False).logits,
                               ref(input_ids=ids, use_cache=False).logits)
    got, want = list(state_items(model)), sorted(ref.state_dict().items())
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert model.config.to_json_string() == ref.config.to_json_string()


def test_at_most_one_layer_is_resident_and_unloaded_weights_are_nan(stories_dir):
    model = open_streamed(stories_dir)
    stream = stream_of(model)
    seen = []
    for layer in stream.layers:
        layer.register_forward_pre_hook(
            lambda m, a: seen.append([i for i, u in enumerate(stream.users) if u]))
    with torch.no_grad():
        model(input_ids=_prompts()[1], use_cache=False)
    assert seen == [[li] for li in range(stream.n_layers)]
    assert stream.users == [0] * stream.n_layers and stream.loads == stream.n_layers
    w = model.model.layers[2].mlp.down_proj.weight
    assert w.untyped_storage().nbytes() == 4 and torch.isnan(w).all()  # one NaN, full shape
    with resident(model, 2):
        assert torch.isfinite(w).all() and w.untyped_storage().nbytes() == w.numel() * 4
    assert torch.isnan(w).all()


def test_a_forward_that_fails_frees_its_layer(stories_dir):
    model = open_streamed(stories_dir)
    stream = stream_of(model)

    def boom(m, a, o):
        raise RuntimeError("boom")

    model.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model(input_ids=_prompts()[0], use_cache=False)
    assert stream.users == [0] * stream.n_layers


def test_transforms_apply_at_every_read_and_never_to_the_file(stories_dir):
    """An in-place edit (the build's permutation) is redone on each read: the file's memory
    map is never edited, so a second read does not apply it twice."""
    model, ref = open_streamed(stories_dir), load_model(stories_dir).model
    stream = stream_of(model)
    stream.add_transform(lambda li: model.model.layers[li].mlp.up_proj.weight.mul_(2))
    for _ in range(2):
        with resident(model, 0):
            assert torch.equal(model.model.layers[0].mlp.up_proj.weight,
                               2 * ref.model.layers[0].mlp.up_proj.weight)
    with resident(model, 0), pytest.raises(RuntimeError, match="resident"):
        stream.add_transform(lambda li: None)


@pytest.mark.parametrize("arch", STREAMABLE)
def test_streamed_analysis_equals_the_whole_trace(arch, tiny_dirs):
    """Two layers traced and the pattern repeated = the whole model traced."""
    smap = analyze(load_model(tiny_dirs[arch]))
    streamed = load_model(tiny_dirs[arch], stream=True)
    got = analyze(streamed)
    assert json.dumps(got.to_json(channels=True)) == json.dumps(smap.to_json(channels=True))
    assert [layer.returns_tuple for layer in got.layers] == \
        [layer.returns_tuple for layer in smap.layers]
    assert streamed.model.model.layers is stream_of(streamed.model).layers  # restored
    assert weight_hash(streamed.model) == weight_hash(load_model(tiny_dirs[arch]).model)


def test_streamed_analysis_of_stories260k(stories, stories_dir):
    _, smap = stories
    got = analyze(load_model(stories_dir, stream=True))
    assert got.to_json(channels=True) == smap.to_json(channels=True)


def test_other_stacks_and_formats_are_refused_in_one_line(tiny_dirs, tmp_path):
    with pytest.raises(UnsupportedModelError, match="model.model.layers"):
        load_model(tiny_dirs["gpt2"], stream=True)
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"x")
    with pytest.raises(UserInputError, match="--stream reads"):
        load_model(pt, stream=True)


def test_streamed_tensors_write_what_save_file_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randn(3, 4, generator=g).bfloat16(), "a.w": torch.randn(5, generator=g),
               "z": torch.arange(7, dtype=torch.int32), "m": torch.zeros(2, 3, dtype=torch.uint8),
               "c": torch.randn(1, generator=g).half(), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(3.0), "flags": torch.tensor([True, False]),
               "i64": torch.ones(3, dtype=torch.int64), "f64": torch.ones(2, dtype=torch.float64)}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    # produced in another order than the file's: each lands at its own offset
    StreamedTensors(specs, lambda: reversed(list(tensors.items()))).write(tmp_path / "s.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_streamed_tensors_refuse_what_was_not_announced(tmp_path):
    from cscompile.errors import BuildError

    specs = {"a": (torch.float32, (2,))}
    with pytest.raises(BuildError, match="not the one announced"):
        StreamedTensors(specs, lambda: iter([("a", torch.zeros(3))])).write(tmp_path / "x")
    with pytest.raises(BuildError, match="never produced"):
        StreamedTensors(specs, lambda: iter([])).write(tmp_path / "y")


def test_cli_refuses_stream_with_the_compact_layout(stories_dir, tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(4)))
    proc = subprocess.run([sys.executable, "-m", "cscompile.cli", "build", str(stories_dir),
                           "--calib", str(calib), "-o", str(tmp_path / "b"), "--stream",
                           "--layout", "compact"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--stream writes the gather layout only" in proc.stderr
    assert not (tmp_path / "b").exists()
