"""cscompile.stream: a model whose decoder layers are read from safetensors one at a time
computes, analyses and writes exactly what the loaded model does; bad uses are one line."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cscompile.errors import UnsupportedModelError, UserInputError
from cscompile.frontend import analyze, load_model, weight_hash
from cscompile.stream import open_streamed, resident, state_items, stream_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STREAMABLE = ("llama", "qwen2", "gemma2", "gemma3_text")  # model.model.layers stacks
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"


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


def test_a_stack_whose_later_layers_differ_is_refused(tiny_dirs):
    """The two-layer trace stands for every layer only if they all have its parameters."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    loaded = load_model(tiny_dirs["llama"], stream=True)
    config = loaded.model.config
    wide = type(config).from_dict({**config.to_dict(), "intermediate_size": 128})
    with torch.device("meta"):
        loaded.model.model.layers[2].mlp = LlamaMLP(wide)
    with pytest.raises(UnsupportedModelError, match="layer 2's parameters differ"):
        analyze(loaded)


def test_other_stacks_and_formats_are_refused_in_one_line(tiny_dirs, tmp_path):
    with pytest.raises(UnsupportedModelError, match="model.model.layers"):
        load_model(tiny_dirs["gpt2"], stream=True)
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"x")
    with pytest.raises(UserInputError, match="--stream reads"):
        load_model(pt, stream=True)


def test_cli_refuses_stream_with_the_compact_layout(stories_dir, tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(4)))
    proc = subprocess.run([sys.executable, "-m", "cscompile.cli", "build", str(stories_dir),
                           "--calib", str(calib), "-o", str(tmp_path / "b"), "--stream",
                           "--layout", "compact"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--stream writes the gather layout only" in proc.stderr
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- SmolLM2
# One build in a fresh process, its memory measured above what the libraries hold: the process
# first builds stories260K (1 MB of weights: every code path and library the build uses is
# imported and warmed), returns its free heap (malloc_trim) and resets the kernel's peak-RSS
# mark (/proc/self/clear_refs "5"); VmHWM at the end is then the SmolLM2 build's own peak.
_DRIVER = r"""
import ctypes, json, re, sys
import torch
torch.set_num_threads(1)
from cscompile.build import run_build
from cscompile.frontend import load_model

def mb(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

warm, model, calib, out, mode = sys.argv[1:6]
run_build(warm, calib, out + ".warm", progress=False, stream=mode == "stream", budget=0.7)
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")
base = mb("VmRSS")
if mode == "load":
    load_model(model)  # the in-memory build's first step, alone
else:
    run_build(model, calib, out, progress=False, stream=mode == "stream", budget=0.7)
print(json.dumps({"base_mb": base, "peak_mb": mb("VmHWM")}))
"""


def _measured(stories_dir, model_dir, calib, out, mode) -> dict:
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(stories_dir), str(model_dir),
                           str(calib), str(out), mode], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _digests(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.slow
def test_a_streamed_smollm2_build_fits_under_the_model_size(stories_dir, smollm2_dir, tmp_path):
    """The whole streamed build's peak memory above the libraries stays below what merely
    loading the model costs the in-memory build (measured the same way: the cap), and its
    bundle is the in-memory build's, file by file."""
    from cscompile.build import run_build

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(EXAMPLES.read_text().splitlines()[:5]) + "\n")
    model = open_streamed(smollm2_dir)
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20  # 513 MiB
    del model
    loading = _measured(stories_dir, smollm2_dir, calib, tmp_path / "loading", "load")
    streamed = _measured(stories_dir, smollm2_dir, calib, tmp_path / "streamed", "stream")
    cap_mb = loading["peak_mb"] - loading["base_mb"]  # measured: +770 MB
    grown = streamed["peak_mb"] - streamed["base_mb"]  # measured: +341..+556 MB
    assert cap_mb > fp32_mb  # loading holds at least the fp32 weights
    assert grown < cap_mb, (streamed, loading, fp32_mb)
    run_build(smollm2_dir, calib, tmp_path / "memory", progress=False, budget=0.7)
    assert _digests(tmp_path / "streamed") == _digests(tmp_path / "memory")
