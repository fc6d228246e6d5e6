"""Token-adaptive refinement: TEAL selection inside the class, the energy monitor, the byte
accounting, and the decode loop's extremes on a tiny random Llama (no bundle needed)."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from cscompile.errors import UserInputError
from cscompile.execute import Support, random_support
from cscompile.passes.route import Router
from cscompile.runtime.refine import (RefineConfig, energy_fraction, gate_up_row_bytes,
                                      measurement_bytes, refined_support_bytes, teal_select)
from cscompile.runtime.session import ClassPath, Session


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_config_validation_and_extremes():
    for bad in (dict(every=0), dict(widen_threshold=-0.1), dict(widen_threshold=math.nan),
                dict(inter_keep=0.0), dict(inter_keep=1.5)):
        with pytest.raises(UserInputError):
            RefineConfig(**bad)
    always = RefineConfig(every=3, widen_threshold=0.0)
    assert always.widens(1.0) and always.widens(0.2)  # threshold 0: every refined token dense
    assert [s for s in range(8) if always.refines_step(s)] == [0, 3, 6]
    never = RefineConfig(widen_threshold=math.inf)
    assert not never.active and not never.refines_step(0)
    half = RefineConfig(widen_threshold=0.5)
    assert half.widens(0.5) and not half.widens(0.51)


def test_teal_keeps_largest_candidates_only():
    h = torch.tensor([[9.0, -5.0, 0.1, -3.0, 2.0, 100.0],
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    cand = torch.tensor([True, True, True, True, True, False])  # channel 5 is not the class's
    keep = teal_select(h, cand, 0.5)  # ceil(0.5 * 5) = 3 per row
    assert keep.tolist() == [[1, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert teal_select(h, cand, 1.0).tolist() == [[1, 1, 1, 1, 1, 0]] * 2
    assert teal_select(h, cand, 0.01).sum(-1).tolist() == [1, 1]  # at least one channel


def test_energy_fraction_is_worst_row():
    h = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    keep = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # rows: 9/25, 1/1, all-zero row counts as fully on support
    assert energy_fraction(h, keep) == pytest.approx(9 / 25)
    assert energy_fraction(h[1:], keep[1:]) == 1.0


def test_byte_accounting_matches_support_bytes(tiny):
    _, smap = tiny("llama")  # hidden 64, FFN width 96, fp32
    assert gate_up_row_bytes(smap, 0) == 2 * 64 * 4
    sup = random_support(smap, 0.5, np.random.default_rng(0))
    layers = sup.kept_layers(smap)
    n_kept = {li: len(c) for li, c in sup.channels.items()}
    ffn = sum(n * smap.channel_bytes(li) for li, n in n_kept.items())
    attn = sup.kept_bytes(smap) - ffn
    assert refined_support_bytes(smap, attn, layers, n_kept) == sup.kept_bytes(smap)
    assert measurement_bytes(smap, layers, {li: 96 for li in layers}) == 0
    assert measurement_bytes(smap, layers, n_kept) == sum(
        (96 - n) * 2 * 64 * 4 for n in n_kept.values())


# ----------------------------------------------------------------------------- decode loop
@pytest.fixture(scope="module")
def tiny_session(tiny, char_tokenizer):
    loaded, smap = tiny("llama")
    sup = random_support(smap, 0.5, np.random.default_rng(1))
    sup.heads[0] = [0, 1, 2]  # kv group 0 keeps two heads, group 1 one: uneven
    router = Router(0, torch.eye(64, 4), torch.zeros(4), torch.tensor([[1.0, 0, 0, 0]]))
    model = copy.deepcopy(loaded.model)  # the session-wide tiny model stays untouched
    model.generation_config.eos_token_id = None
    return Session(model, char_tokenizer(), smap, [ClassPath(0, sup, sup.density(smap))],
                   router, is_bundle=True, execution="masked")  # masked: energies measured


def test_refinement_extremes_on_tiny_model(tiny_session):
    s, prompt = tiny_session, "hello world"
    dense = s.generate(prompt, max_new_tokens=12, dense=True)
    static = s.generate(prompt, max_new_tokens=12)
    assert static.token_ids != dense.token_ids
    assert s.generate(prompt, max_new_tokens=12,
                      refine=RefineConfig(1, 0.0)).token_ids == dense.token_ids
    # keeping every candidate and never widening is the static class path, monitored
    watched = s.generate(prompt, max_new_tokens=12, refine=RefineConfig(1, 1.0, 1.0))
    assert watched.token_ids == static.token_ids
    assert [x["action"] for x in watched.refinements] == ["keep"] * 11
    assert [x["energy"] for x in watched.refinements] == pytest.approx(static.energy)
    assert all(0 < e < 1 for e in static.energy)
    # refining every 4th token with a smaller support changes only those steps' density
    r = s.generate(prompt, max_new_tokens=12, refine=RefineConfig(4, 1.0, 0.25))
    assert [x["token"] for x in r.refinements] == [1, 5, 9]
    for k, d in enumerate(r.densities):
        assert (d < static.densities[0]) == (k % 4 == 0)


def test_generation_stops_at_the_context(tiny_session):
    r = tiny_session.generate("x" * 120, max_new_tokens=50)  # context 128
    assert len(r.token_ids) == 8 and r.finish_reason == "context"
    with pytest.raises(UserInputError, match="context"):
        tiny_session.generate("x" * 128)


def test_compact_static_path_equals_masked(tiny_session):
    """The reduced copy with a sliced prefill cache decodes like the masks over the dense model
    (this support keeps kv groups unevenly, so the cache is expanded per kept query head)."""
    s = tiny_session
    uneven = []
    for li, heads in s.classes[0].support.heads.items():
        a = s.smap.layers[li].attention
        groups = [a.kv_group_of(h) for h in heads]
        uneven.append(len({groups.count(g) for g in groups}) > 1)
    assert any(uneven)
    compact = dataclasses.replace(s, execution="compact", _compact={})
    for prompt in ("hello world", "abc"):
        r = compact.generate(prompt, max_new_tokens=12)
        assert r.token_ids == s.generate(prompt, max_new_tokens=12).token_ids
        assert r.energy == [None] * 11
    assert compact._compact[0] is not None


def test_chat_template_used_only_when_asked(tiny_session, char_tokenizer):
    class ChatTokenizer(char_tokenizer):
        chat_template = "stub"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}<bot>"

    s = dataclasses.replace(tiny_session, tokenizer=ChatTokenizer())
    assert s.generate("hi", max_new_tokens=2, chat=True).prompt_tokens == len("<user>hi<bot>")
    assert s.generate("hi", max_new_tokens=2).prompt_tokens == 2
    assert tiny_session.generate("hi", max_new_tokens=2, chat=True).prompt_tokens == 2
