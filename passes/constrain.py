"""Hardware-constrained class supports, and channel permutations that make them contiguous.

`class_support` turns a class's member importances into a Support that keeps `density` of the
model's prunable bytes:
  * consensus score = mean of the members' (per-layer normalised) importances;
  * an always-on core — units that every class ranks highly (`core_scores`) — is taken first,
    up to `core_share` of the budget;
  * each layer's `min_heads` best heads are reserved first;
  * the rest of the budget goes greedily, across ALL layers at once, to the items with the
    best score per byte, so layers get different amounts (non-uniform allocation);
  * FFN channels are taken in tile-sized chunks (each layer's channels sorted by score, chunk
    i = the i-th group of `tile`; the last one may be partial), so every layer keeps a
    multiple of `tile` channels or all of them; heads are kept whole.
`channel_permutation` + `apply_permutation` reorder FFN channels so co-activated channels sit
together (an exact re-parameterisation: gate/up rows and down columns move together).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from cscompile.errors import UserInputError
from cscompile.execute import Support
from cscompile.stream import stream_of
from cscompile.structure import StructureMap

from .signature import unit_layout


def core_scores(signatures: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per unit, the lowest class consensus: high only for units every class ranks highly."""
    classes = sorted(set(int(x) for x in labels))
    return np.stack([signatures[labels == c].mean(0) for c in classes]).min(0)


def class_support(smap: StructureMap, member_importances: np.ndarray, density: float,
                  core_importance: np.ndarray | None = None, heads_keep: int | None = None,
                  min_heads: int = 1, tile: int = 64, pad_to_tile: bool = True,
                  core_share: float = 0.25, allocation: str = "greedy",
                  kv_groups: bool = False, skip_layers=()) -> Support:
    """The Support keeping ~`density` of prunable bytes, chosen from the members' importances.

    allocation="greedy" ranks heads and FFN chunks by importance per byte across all layers
    (non-uniform budgets); "uniform" keeps `heads_keep` (default: all) heads per layer and the
    same FFN fraction in every layer, ranked within each layer by the class's scores.
    kv_groups=True keeps heads in whole kv groups (a group's k/v rows are then never read for
    a dropped head). `skip_layers` are removed whole; their bytes go to the remaining layers."""
    if not 0 < density <= 1:
        raise UserInputError(f"density must be in (0, 1], got {density}")
    if allocation not in ("greedy", "uniform"):
        raise UserInputError(f"allocation must be greedy or uniform, got {allocation!r}")
    layout = unit_layout(smap)
    score = np.asarray(member_importances, dtype=np.float64).reshape(-1, layout.n_units).mean(0)
    budget = density * smap.prunable_bytes()
    chunk = tile if pad_to_tile else 1
    skip = sorted(set(int(li) for li in skip_layers))
    if skip:
        if len(skip) >= smap.n_layers or any(not 0 <= li < smap.n_layers for li in skip):
            raise UserInputError(f"skip_layers {skip} must name some but not all of the "
                                 f"{smap.n_layers} layers")
        layout = _without_layers(layout, skip)
    if allocation == "uniform":
        sup = _uniform_support(smap, layout, score, budget, heads_keep, tile if pad_to_tile else 1,
                               kv_groups)
    else:
        sup = _greedy_support(smap, layout, score, budget, core_importance, heads_keep, min_heads,
                              tile, pad_to_tile, chunk, core_share, kv_groups)
    if skip:
        sup.layers = [li for li in range(smap.n_layers) if li not in skip]
    return sup


def _without_layers(layout, skip):
    from .signature import UnitLayout

    return UnitLayout({li: sl for li, sl in layout.heads.items() if li not in skip},
                      {li: sl for li, sl in layout.channels.items() if li not in skip},
                      layout.n_units)


def _group_items(smap, li, values):
    """(value, bytes, members) of each kv group of layer li: all its heads and its k/v rows."""
    a = smap.layers[li].attention
    per = a.n_heads // a.n_kv_heads
    cost = per * smap.head_bytes(li) + smap.kv_group_bytes(li)
    return [(float(values[g * per:(g + 1) * per].sum()), cost, list(range(g * per, (g + 1) * per)))
            for g in range(a.n_kv_heads)]


def _greedy_support(smap, layout, score, budget, core_importance, heads_keep, min_heads, tile,
                    pad_to_tile, chunk, core_share, kv_groups) -> Support:
    heads: dict[int, set[int]] = {li: set() for li in layout.heads}
    chans: dict[int, list[int]] = {li: [] for li in layout.channels}
    # each layer's best heads first: min_heads always (within the budget), or exactly
    # heads_keep, in which case only channels compete for the rest
    for li, sl in layout.heads.items():
        want = min_heads if heads_keep is None else max(heads_keep, min_heads)
        n = min(want, smap.layers[li].attention.n_heads)
        if kv_groups:  # best whole groups until `want` heads are covered
            for _, _, members in sorted(_group_items(smap, li, score[sl]), key=lambda g: -g[0]):
                if len(heads[li]) >= n:
                    break
                heads[li].update(members)
        else:
            heads[li] = set(np.argsort(-score[sl], kind="stable")[:n].tolist())

    def items_for(values: np.ndarray):
        """Selectable items (score, bytes, kind, layer, members) ranked by score per byte."""
        out = []
        if heads_keep is None and kv_groups:
            for li, sl in layout.heads.items():
                for value, cost, members in _group_items(smap, li, values[sl]):
                    out.append((value, cost, "group", li, members))
        elif heads_keep is None:
            for li, sl in layout.heads.items():
                a = smap.layers[li].attention
                cost = smap.head_bytes(li) + smap.kv_group_bytes(li) / (a.n_heads // a.n_kv_heads)
                for h in range(a.n_heads):
                    out.append((values[sl][h], cost, "head", li, [h]))
        for li, sl in layout.channels.items():
            kept = set(chans[li])  # chunk only what is not kept yet: counts stay tile multiples
            order = np.array([j for j in np.argsort(-values[sl], kind="stable") if j not in kept],
                             dtype=np.int64)
            for s in range(0, len(order), chunk):
                members = order[s:s + chunk].tolist()
                out.append((values[sl][members].sum(), len(members) * smap.channel_bytes(li),
                            "chunk", li, members))
        out.sort(key=lambda it: (-it[0] / it[1], it[3], it[4][0]))
        return out

    skipped: list = []  # per layer, the first chunk that did not fit

    def take(items, limit):
        used = _bytes(smap, heads, chans)
        closed = set()  # a layer whose next chunk did not fit takes no later (worse) chunk
        skipped.clear()
        for value, cost, kind, li, members in items:
            if kind in ("head", "group"):
                if set(members) <= heads[li]:
                    continue
                if kind == "group":  # a partly kept group (from the reservation) costs less
                    cost = _bytes(smap, {li: heads[li] | set(members)}, {}) - \
                        _bytes(smap, {li: heads[li]}, {})
                if used + cost <= limit:
                    heads[li].update(members)
                    used += cost
            elif li not in closed:  # chunks of one call never overlap (see items_for)
                if used + cost <= limit:
                    chans[li].extend(members)
                    used += cost
                else:
                    closed.add(li)
                    skipped.append((value / cost, li, members, cost))
        return used

    if core_importance is not None and core_share > 0:
        take(items_for(np.asarray(core_importance, dtype=np.float64)), core_share * budget)
    used = take(items_for(score), budget)
    # round to the nearest reachable budget: add a skipped chunk when that lands closer
    for _, li, new, extra in sorted(skipped, key=lambda s: (-s[0], s[1])):
        if abs(used + extra - budget) < abs(used - budget):
            chans[li].extend(new)
            used += extra

    if pad_to_tile:
        for li in layout.channels:
            chans[li] = _to_tile_multiple(chans[li], score[layout.channels[li]], tile)
    return Support({li: sorted(int(h) for h in hs) for li, hs in heads.items()},
                   {li: sorted(int(c) for c in cs) for li, cs in chans.items()}, None)


def _uniform_support(smap, layout, score, budget, heads_keep, tile, kv_groups=False) -> Support:
    """Same FFN fraction in every layer (Wanda/FLAP-style), class-specific ranking within it."""
    heads = {}
    for li, sl in layout.heads.items():
        n = smap.layers[li].attention.n_heads if heads_keep is None else heads_keep
        if kv_groups:
            kept = []
            for _, _, members in sorted(_group_items(smap, li, score[sl]), key=lambda g: -g[0]):
                if len(kept) >= n:
                    break
                kept += members
            heads[li] = sorted(kept)
        else:
            heads[li] = sorted(np.argsort(-score[sl], kind="stable")[:n].tolist())
    head_bytes = _bytes(smap, {li: set(h) for li, h in heads.items()}, {li: [] for li in layout.channels})
    ffn_total = sum(smap.layers[li].ffn.width * smap.channel_bytes(li) for li in layout.channels)
    frac = min(1.0, max(0.0, (budget - head_bytes) / ffn_total)) if ffn_total else 0.0
    chans = {}
    for li, sl in layout.channels.items():
        width = smap.layers[li].ffn.width
        n = min(width, max(tile, int(round(frac * width / tile)) * tile))
        chans[li] = sorted(np.argsort(-score[sl], kind="stable")[:n].tolist())
    return Support({li: [int(h) for h in hs] for li, hs in heads.items()},
                   {li: [int(c) for c in cs] for li, cs in chans.items()}, None)


def _to_tile_multiple(kept: list[int], scores: np.ndarray, tile: int) -> list[int]:
    """Pad a layer's kept channels up to a multiple of `tile` (or all) with its best others."""
    width = len(scores)
    target = min(width, -(-len(kept) // tile) * tile)
    kept_set = set(kept)
    for c in np.argsort(-scores, kind="stable"):
        if len(kept_set) >= target:
            break
        kept_set.add(int(c))
    return sorted(kept_set)


def _bytes(smap, heads, chans) -> int:
    """Exact kept bytes of a partial selection (kv groups counted once per kept group)."""
    # only the layers named here count (skipped layers are not in the selection at all)
    return Support({li: list(h) for li, h in heads.items()},
                   {li: list(c) for li, c in chans.items()},
                   sorted(set(heads) | set(chans))).kept_bytes(smap)


# ----------------------------------------------------------------------------- permutation
def channel_profiles(signatures: np.ndarray, smap: StructureMap) -> dict[int, np.ndarray]:
    """Per layer, each channel's activation profile over prompts: [width, P]."""
    layout = unit_layout(smap)
    return {li: np.asarray(signatures)[:, sl].T for li, sl in layout.channels.items()}


def channel_permutation(coactivation_profiles: dict[int, np.ndarray], tile: int = 64,
                        seed: int = 0) -> dict[int, np.ndarray]:
    """Per layer a permutation (new position -> old channel) grouping co-activated channels.

    Crude k-means on the L2-normalised profiles with ceil(width / tile) clusters; clusters are
    laid out by decreasing mean energy, channels inside a cluster by decreasing energy.
    """
    perms = {}
    for li, prof in sorted(coactivation_profiles.items()):
        prof = np.asarray(prof, dtype=np.float64)
        width = prof.shape[0]
        energy = prof.mean(1)
        k = min(width, -(-width // tile))
        if k <= 1 or prof.shape[1] < 2:
            perms[li] = np.argsort(-energy, kind="stable")
            continue
        x = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x).labels_
        cluster_rank = sorted(set(labels.tolist()), key=lambda c: -energy[labels == c].mean())
        rank_of = {c: r for r, c in enumerate(cluster_rank)}
        perms[li] = np.array(sorted(range(width),
                                    key=lambda j: (rank_of[labels[j]], -energy[j], j)))
    return perms


@torch.no_grad()
def apply_permutation(model: torch.nn.Module, smap: StructureMap,
                      perms: dict[int, np.ndarray]) -> torch.nn.Module:
    """Reorder FFN channels in place: new channel i = old channel perms[l][i] (logits unchanged).
    A layer-streamed model permutes each layer as it is read (cscompile.stream)."""
    idx = {}
    for li, perm in perms.items():
        idx[li] = torch.as_tensor(np.asarray(perm), dtype=torch.long)
        width = smap.layers[li].ffn.width
        if sorted(idx[li].tolist()) != list(range(width)):
            raise UserInputError(f"layer {li}: not a permutation of its {width} channels")

    def permute(li: int) -> None:
        if li not in idx:
            return
        f = smap.layers[li].ffn
        out_dim = 0 if f.weight_layout == "out_in" else 1
        for path in (f.gate, f.up):
            if path is None:
                continue
            mod = model.get_submodule(path)
            mod.weight.copy_(mod.weight.index_select(out_dim, idx[li]))
            if getattr(mod, "bias", None) is not None:
                mod.bias.copy_(mod.bias.index_select(0, idx[li]))
        down = model.get_submodule(f.down)
        down.weight.copy_(down.weight.index_select(1 - out_dim, idx[li]))

    stream = stream_of(model)
    if stream is not None:
        stream.add_transform(permute)
    else:
        for li in idx:
            permute(li)
    return model


def permute_support(support: Support, perms: dict[int, np.ndarray]) -> Support:
    """The same support expressed in permuted channel numbering."""
    channels = {}
    for li, kept in support.channels.items():
        if li in perms:
            new_pos = np.empty(len(perms[li]), dtype=np.int64)
            new_pos[np.asarray(perms[li])] = np.arange(len(perms[li]))
            channels[li] = sorted(int(new_pos[c]) for c in kept)
        else:
            channels[li] = list(kept)
    return Support(dict(support.heads), channels, support.layers)
