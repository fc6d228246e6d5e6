"""Loading every supported input format, and refusing bad input with one clear line."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from cscompile.errors import UnsupportedModelError, UserInputError
from cscompile.frontend import analyze, load_model, logits_of
from cscompile.toy import TinyTransformer


def test_hf_directory(stories_dir):
    loaded = load_model(stories_dir)
    assert loaded.model_id == "stories260K" and loaded.tokenizer is not None
    assert loaded.context_length == 512 and loaded.vocab_size == 512


def test_state_dict_plus_config(tmp_path, tiny):
    loaded, _ = tiny("llama")
    cfg = loaded.model.config.to_dict()
    path = tmp_path / "model.pt"
    torch.save({"config": cfg, "state_dict": loaded.model.state_dict()}, path)
    again = load_model(path)  # weights_only=True suffices
    ids = torch.randint(0, 96, (1, 6))
    assert torch.equal(logits_of(again.model, ids), logits_of(loaded.model, ids))


def test_pickled_module_needs_trust(tmp_path):
    model = TinyTransformer().eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with pytest.raises(UserInputError, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    smap = analyze(loaded)
    assert smap.n_layers == 3 and smap.layers[0].attention.n_heads == 4


def test_exported_program_pt2(tmp_path):
    model = TinyTransformer().eval()
    ids = torch.randint(0, 96, (1, 8))
    ep = torch.export.export(model, (ids,))
    path = tmp_path / "model.pt2"
    torch.export.save(ep, str(path))
    loaded = load_model(path)
    smap = analyze(loaded)
    assert smap.n_layers == 3 and smap.layers[0].ffn.width == 100
    assert torch.allclose(logits_of(loaded.model, ids), model(ids), atol=1e-5)
    # masking hooks reach the unflattened submodules: masked == sliced on the original model
    import numpy as np

    from cscompile.execute import UnitMask, masked_logits, random_support, reduce_model

    sup = random_support(smap, 0.5, np.random.default_rng(0))
    via_export = masked_logits(loaded.model.inner, smap, ids, UnitMask.from_supports(smap, [sup]))
    with torch.no_grad():
        sliced = logits_of(reduce_model(model, smap, sup), ids)
    assert (via_export - sliced).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["missing", "no_config", "suffix", "truncated", "bare_state_dict",
                                  "bad_gguf", "unknown_name"])
def test_bad_inputs(tmp_path, case):
    if case == "missing":
        src, err = tmp_path / "nope.pt", UserInputError
    elif case == "no_config":
        src, err = tmp_path, UnsupportedModelError
    elif case == "suffix":
        src, err = tmp_path / "model.onnx", UnsupportedModelError
        src.write_bytes(b"x")
    elif case == "truncated":
        good = tmp_path / "good.pt"
        torch.save({"config": {}, "state_dict": {}}, good)
        src, err = tmp_path / "model.pt", UserInputError
        src.write_bytes(good.read_bytes()[:100])
    elif case == "bare_state_dict":
        src, err = tmp_path / "model.pt", UnsupportedModelError
        torch.save(TinyTransformer().state_dict(), src)
    elif case == "bad_gguf":
        src, err = tmp_path / "model.gguf", UnsupportedModelError
        src.write_bytes(b"GGUF" + b"\0" * 20)
    else:
        src, err = "llama-9000", UserInputError
    with pytest.raises(err) as info:
        load_model(src)
    assert "\n" not in str(info.value)


def test_gguf_second_load_is_served_from_the_cache(tmp_path, monkeypatch):
    """Dequantizing a GGUF is slow (97 s for SmolLM2's on 2 cores), so it happens once: the
    second load of the same file reads the Hugging Face directory cached by its sha256."""
    import hashlib
    import time
    from pathlib import Path

    import cscompile.models as models

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fuzz_targets import tiny_gguf

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    conversions, convert = [], models._load_dense_from_gguf
    monkeypatch.setattr(models, "_load_dense_from_gguf",
                        lambda path, dtype: conversions.append(path) or convert(path, dtype))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf())
    loads, seconds = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        loads.append(load_model(path))
        seconds.append(time.perf_counter() - t0)
    print(f"GGUF load: first {seconds[0]:.2f} s (converted), second {seconds[1]:.2f} s (cached)")
    assert conversions == [path]  # the second load converted nothing
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "cache" / "models" / f"gguf-sha256-{digest}" / "config.json").is_file()
    first, second = loads
    assert first.model_id == second.model_id == "tiny" and second.tokenizer is not None
    assert second.storage_dtype == torch.bfloat16
    ids = torch.randint(0, 32, (1, 5))
    assert torch.equal(logits_of(first.model, ids), logits_of(second.model, ids))


class _NoTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def test_graph_without_attention_or_ffn_is_refused(tmp_path):
    from cscompile.frontend import LoadedModel

    with pytest.raises(UnsupportedModelError, match="no recognisable attention or FFN"):
        analyze(LoadedModel(_NoTransformer().eval(), "bag-of-words"))


def _cli(*args, cwd):
    env = dict(os.environ, CSCOMPILE_DEBUG="")
    return subprocess.run([sys.executable, "-m", "cscompile.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_cli_inspect_and_json(tmp_path, stories_dir):
    out = tmp_path / "map.json"
    r = _cli("inspect", str(stories_dir), "--json", str(out), "--tile", "32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model bytes 1,040,128" in r.stdout
    import json

    d = json.loads(out.read_text())
    assert d["tile"] == 32 and len(d["layers"]) == 5
    assert sum(u["kind"] == "ffn_block" for u in d["units"]) == 5 * 6  # 172 / 32 -> 6 blocks


@pytest.mark.parametrize("args,code", [(["inspect", "does/not/exist"], 2),
                                       (["inspect", "model.pt"], 2)])
def test_cli_bad_input_one_line(tmp_path, args, code):
    if "model.pt" in args:
        torch.save(TinyTransformer(), tmp_path / "model.pt")  # pickle without --trust-pickle
    out = tmp_path / "map.json"
    r = _cli(*args, "--json", str(out), cwd=tmp_path)
    assert r.returncode == code
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: ")
    assert not out.exists()


def test_cli_version():
    r = subprocess.run([sys.executable, "-m", "cscompile.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "0.1.0" in r.stdout
