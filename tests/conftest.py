"""Shared fixtures. Triton's interpreter must be switched on before any kernel is defined."""
import os

try:  # no GPU: run Triton kernels in the interpreter (fp32 only, see codegen tests)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (real models and data live there)")
    return SHARED


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260K is absent")
    return STORIES


# ----------------------------------------------------------------------------- real SmolLM2
@pytest.fixture(scope="session")
def cscompile_cache(tmp_path_factory):
    """Point cscompile's model cache at a session temp dir (never the user's real cache).

    A cache set by the caller through $CSCOMPILE_CACHE is kept, so a developer can reuse
    one conversion across runs: `CSCOMPILE_CACHE=~/.cache/cscompile-test make test`.
    """
    from cscompile.models import CACHE_ENV

    if os.environ.get(CACHE_ENV):
        yield os.environ[CACHE_ENV]
        return
    root = tmp_path_factory.mktemp("cscompile-cache")
    os.environ[CACHE_ENV] = str(root)  # also seen by CLI subprocesses started by tests
    try:
        yield str(root)
    finally:
        os.environ.pop(CACHE_ENV, None)


@pytest.fixture(scope="session")
def smollm2_dir(cscompile_cache):
    """The converted bf16 Hugging Face directory of SmolLM2-135M-Instruct (converted once)."""
    from cscompile.errors import UnsupportedModelError
    from cscompile.models import NAMED_MODELS, find_gguf, resolve_model

    model = NAMED_MODELS["smollm2-135m"]
    try:
        find_gguf(model)
    except UnsupportedModelError:
        pytest.skip(f"SmolLM2 wheel not installed: {model.install_command}")
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(LoadedModel, StructureMap) of SmolLM2-135M in fp32, analysed once per session."""
    from cscompile.frontend import analyze, load_model

    loaded = load_model(smollm2_dir)
    return loaded, analyze(loaded)


@pytest.fixture(scope="session")
def pertoken_bundle(stories_dir, tmp_path_factory) -> Path:
    """A stories260K bundle with its per-token path at budget 0.6 (built once per run)."""
    from cscompile.build import run_build

    out = tmp_path_factory.mktemp("pt") / "bundle"
    examples = Path(__file__).resolve().parents[1] / "examples" / "calib.jsonl"
    run_build(str(stories_dir), examples, out, progress=False, budget=0.6)
    return out


@pytest.fixture(scope="session")
def stories(stories_dir):
    """(LoadedModel, StructureMap) of stories260K."""
    from cscompile.frontend import analyze, load_model

    loaded = load_model(stories_dir)
    return loaded, analyze(loaded)


# ----------------------------------------------------------------------------- tiny architectures
TINY_CONFIGS = {
    "llama": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "gpt_neox": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=128),
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=128, n_inner=96,
                 bos_token_id=0, eos_token_id=0),
    "gemma2": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=128),
    "gemma3_text": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=128),
}
# what discovery must find in each (heads, kv heads, head_dim, gated FFN, activation)
TINY_EXPECTED = {
    "llama": (4, 2, 16, True, "silu"), "qwen2": (4, 2, 16, True, "silu"),
    "gpt_neox": (4, 4, 16, False, "gelu"), "gpt2": (4, 4, 16, False, "gelu_tanh"),
    "gemma2": (4, 2, 16, True, "gelu_tanh"), "gemma3_text": (4, 2, 16, True, "gelu_tanh"),
    "toy": (4, 4, 12, False, "gelu"),
}
ARCHS = list(TINY_EXPECTED)


def make_tiny(arch: str):
    """A randomly initialised small model of `arch` (weights scaled up so masks matter)."""
    import torch

    torch.manual_seed(0)
    if arch == "toy":
        from cscompile.toy import TinyTransformer

        return TinyTransformer().eval()
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TINY_CONFIGS[arch]))
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny(request):
    """Factory: tiny(arch) -> (LoadedModel, StructureMap), cached per session."""
    from cscompile.frontend import LoadedModel, analyze

    cache = {}

    def get(arch):
        if arch not in cache:
            loaded = LoadedModel(make_tiny(arch), arch)
            cache[arch] = (loaded, analyze(loaded))
        return cache[arch]

    return get


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    """Every architecture the frontend must handle (parametrises a test over them)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_expected() -> dict:
    return TINY_EXPECTED


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and much faster on a busy 2-core machine
    (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def poison(monkeypatch):
    """torch.empty returns NaN-filled float tensors while a test runs, so an output element a
    kernel never writes shows up (kernel tests)."""
    import torch

    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


class CharTokenizer:
    """Enough of a tokenizer for the decode loop: one id per character, no EOS."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(ch) % 100 for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids)


@pytest.fixture(scope="session")
def char_tokenizer():
    """The CharTokenizer class (tests on tiny random models, which ship no tokenizer)."""
    return CharTokenizer
