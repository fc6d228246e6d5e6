"""Find a model's prunable structure in its `torch.export` graph — by pattern, not by name.

  1. Linear layers are `aten.linear` / `aten.addmm` (GPT-2 Conv1D) nodes whose weight is a
     parameter.
  2. Attention cores are `scaled_dot_product_attention` nodes, or the eager pattern
     softmax(q @ kᵀ) @ v. Walking back from q, k, v (and forward from the output to the next
     linear) finds the q/k/v/o projections, fused or not.
  3. FFNs are linear -> elementwise ops -> linear chains hidden -> width -> hidden; the input
     linear whose path goes through an activation is the gate.
  4. Head layouts come from probing the graph with autograd rather than trusting reshapes:
     which projection rows feed each head of q, k, v (RoPE and q/k norms mix only within a
     head), and which o-projection input column each head output lands in. A layout that does
     not probe cleanly is reported and left dense, never guessed.
"""

from __future__ import annotations

import re
from collections import deque

import torch
import torch.fx
from torch.utils import _pytree as pytree

from .errors import UnsupportedModelError
from .structure import AttentionInfo, FFNInfo, LayerInfo, StructureMap

aten = torch.ops.aten
LINEAR_OPS = {aten.linear.default, aten.addmm.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
ACTIVATIONS = {
    aten.silu.default: "silu", aten.gelu.default: "gelu", aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid", aten.tanh.default: "gelu_tanh",
}
# ops that act on each channel independently (a FFN's intermediate may only pass through these)
ELEMENTWISE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
    aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar, aten.neg.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.alias.default, aten.dropout.default, aten.erf.default, aten.exp.default,
    aten.contiguous.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    *ACTIVATIONS,
}


class _Linear:
    def __init__(self, node, weight: str, bias: str | None, layout: str, shape):
        self.node, self.weight, self.bias, self.layout = node, weight, bias, layout
        self.module = weight.rsplit(".", 1)[0]
        self.out_features = shape[0] if layout == "out_in" else shape[1]
        self.in_features = shape[1] if layout == "out_in" else shape[0]


def _find_linears(ep) -> dict:
    params = ep.graph_signature.inputs_to_parameters
    found = {}
    for n in ep.graph.nodes:
        if n.op != "call_function" or n.target not in LINEAR_OPS:
            continue
        if n.target == aten.linear.default:
            w, b, layout = n.args[1], (n.args[2] if len(n.args) > 2 else None), "out_in"
        else:  # addmm(bias, x, W[in, out]) — GPT-2's Conv1D
            b, w, layout = n.args[0], n.args[2], "in_out"
        if not isinstance(w, torch.fx.Node) or w.name not in params:
            continue
        bias = params.get(b.name) if isinstance(b, torch.fx.Node) else None
        found[n] = _Linear(n, params[w.name], bias, layout, tuple(w.meta["val"].shape))
    return found


def _walk_back(start, linears, stop=()):
    """Nodes reachable backwards from `start` without passing through a linear; the linears hit."""
    seen, hit, queue = set(), [], deque([start])
    while queue:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        if n in linears and n is not start:
            hit.append(n)
            continue
        if n in stop and n is not start:
            continue
        queue.extend(n.all_input_nodes)
    return hit, seen


def _attention_cores(graph):
    """(q, k, v, out) nodes of every attention core, in graph order."""
    cores = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in SDPA_OPS:
            cores.append((n.args[0], n.args[1], n.args[2], n))
        elif n.target in SOFTMAX_OPS:
            # eager: scores = q @ kᵀ (then scale / mask / softcap) -> softmax -> @ v
            score_mm = _nearest(n, lambda m: m.target in MATMUL_OPS, back=True)
            pv_mm = _nearest(n, lambda m: m.target in MATMUL_OPS, back=False)
            if score_mm is None or pv_mm is None:
                continue
            cores.append((score_mm.args[0], score_mm.args[1], pv_mm.args[1], pv_mm))
    return cores


def _nearest(node, pred, back: bool, limit: int = 12):
    queue, seen = deque([(node, 0)]), set()
    while queue:
        n, d = queue.popleft()
        if n in seen or d > limit:
            continue
        seen.add(n)
        if n is not node and n.op == "call_function" and pred(n):
            return n
        queue.extend((m, d + 1) for m in (n.all_input_nodes if back else n.users))
    return None


def _layer_module(module: str) -> str | None:
    """The residual block a module lives in: the deepest ancestor path ending in an index."""
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if re.fullmatch(r"\d+", parts[i]):
            return ".".join(parts[: i + 1])
    return None


def _common_prefix(paths) -> str:
    split = [p.split(".") for p in paths]
    out = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)


# ----------------------------------------------------------------------------- probing
def _run_graph(ep, example_args, example_kwargs):
    """Run the exported graph with autograd on, keeping every intermediate value."""
    sig = ep.graph_signature
    user_vals = iter([v for v in pytree.tree_leaves((example_args, example_kwargs))])
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    inputs = []
    for spec, ph in zip(sig.input_specs, placeholders):
        kind = spec.kind.name
        if kind == "PARAMETER":
            inputs.append(ep.state_dict[spec.target].detach().float().requires_grad_(True))
        elif kind == "BUFFER":
            t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            inputs.append(t)
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            inputs.append(ep.constants[spec.target])
        else:
            inputs.append(next(user_vals))
    interp = torch.fx.Interpreter(ep.graph_module, garbage_collect_values=False)
    with torch.enable_grad():
        interp.run(*inputs)
    return interp.env


def _grad(out, wrt, weights):
    (g,) = torch.autograd.grad((out * weights).sum(), [wrt], retain_graph=True, allow_unused=True)
    return torch.zeros_like(wrt) if g is None else g


def _rows_per_head(env, head_node, lin_node, n_heads_in_tensor):
    """For each head of the 4D tensor at head_node ([B, H, T, D] or [B, H, D, T]), the rows of
    the linear output that feed it. Two backward passes: with weight 1 and with weight h+1 on
    head h; their ratio names the head of every row (rows feed exactly one head)."""
    x, y = env[lin_node], env[head_node]
    labels = torch.arange(1, n_heads_in_tensor + 1, dtype=y.dtype).view(1, -1, 1, 1)
    g1 = _grad(y, x, torch.ones_like(y)).reshape(-1, x.shape[-1]).abs().sum(0)
    gl = _grad(y, x, labels.expand_as(y)).reshape(-1, x.shape[-1])
    gl = gl.abs().sum(0)
    rows = (g1 > 1e-12).nonzero().flatten()
    ratio = gl[rows] / g1[rows]
    return rows, ratio


def _o_columns(env, out_node, o_lin, n_heads, head_dim):
    """o-projection input column of every (head, dim) of the attention output: the output's
    gradient under column labels c+1 carries the label unchanged (pure data movement)."""
    o_in = env[o_lin.node.args[0] if o_lin.layout == "out_in" else o_lin.node.args[1]]
    out = env[out_node]
    labels = torch.arange(1, o_in.shape[-1] + 1, dtype=o_in.dtype)
    g = _grad(o_in, out, labels)
    if out.dim() != 4 or out.shape[1] != n_heads or out.shape[-1] != head_dim:
        return None
    per = g.permute(1, 3, 0, 2).reshape(n_heads, head_dim, -1)  # [H, D, B*T]
    if not torch.allclose(per, per[..., :1].expand_as(per)):
        return None
    cols = per[..., 0].round().long() - 1
    if sorted(cols.flatten().tolist()) != list(range(o_in.shape[-1])):
        return None
    return cols.tolist()


def _group_rows(rows, ratio, expect_groups, head_dim):
    """Split `rows` by the (rounded) head label they carry; None unless every label owns
    exactly head_dim rows."""
    keys = torch.round(ratio * 1000) / 1000
    uniq = sorted(set(keys.tolist()))
    if len(uniq) != expect_groups:
        return None, None
    groups = [rows[keys == u].tolist() for u in uniq]
    if any(len(g) != head_dim for g in groups):
        return None, None
    return groups, uniq


# ----------------------------------------------------------------------------- entry point
def discover(model, ep, example_args, example_kwargs, model_id: str,
             storage_dtype: torch.dtype | None = None, tile: int = 64) -> StructureMap:
    """Build the StructureMap of `model` from its exported program `ep`."""
    linears = _find_linears(ep)
    env = _run_graph(ep, example_args, example_kwargs)
    unidentified: list[str] = []
    used: set = set()

    attentions = []
    for q_n, k_n, v_n, out_n in _attention_cores(ep.graph):
        info = _identify_attention(env, linears, q_n, k_n, v_n, out_n, unidentified)
        if info is not None:
            attentions.append(info)
            used.update(info[1])

    ffns = []
    for d_node, d in linears.items():
        if d_node in used:
            continue
        info = _identify_ffn(env, linears, d_node, used)
        if info is not None:
            ffns.append(info)
            used.update(info[1])

    for n, lin in linears.items():
        if n not in used and lin.in_features != lin.out_features and _layer_module(lin.module):
            unidentified.append(f"{lin.module}: linear outside any recognised attention/FFN; left dense")

    if not attentions and not ffns:
        raise UnsupportedModelError(
            f"{model_id}: no recognisable attention or FFN in the traced graph "
            f"({len(linears)} linear layers found); nothing can be pruned")

    layers = _assemble_layers(attentions, ffns)
    params, total = param_table(model, storage_dtype)
    for layer in layers:
        layer.param_bytes = sum(s[1] * int(torch.tensor(s[0]).prod())
                                for n, s in params.items() if n.startswith(layer.module + "."))
    hidden = next((lin.in_features for lin in linears.values()), 0)
    dtype = str(storage_dtype or next(model.parameters()).dtype).replace("torch.", "")
    return StructureMap(model_id, type(model).__name__, dtype, total, hidden, layers, params,
                        unidentified, tile)


def param_table(model, storage_dtype: torch.dtype | None = None):
    """({parameter name: (shape, bytes per element in storage)}, total bytes); tied weights
    once (named_parameters dedups them)."""
    params, total = {}, 0
    for name, p in model.named_parameters():
        elsize = (torch.empty(0, dtype=storage_dtype).element_size()
                  if storage_dtype is not None else p.element_size())
        params[name] = (list(p.shape), elsize)
        total += p.numel() * elsize
    return params, total


def _identify_attention(env, linears, q_n, k_n, v_n, out_n, unidentified):
    q_lins = _walk_back(q_n, linears)[0]
    k_lins = _walk_back(k_n, linears)[0]
    v_lins = _walk_back(v_n, linears)[0]
    # the o projection: the first linear downstream of the core output
    o_node = _nearest(out_n, lambda m: m in linears, back=False)
    where = linears[o_node].module if o_node is not None else str(out_n)
    if len(q_lins) != 1 or len(k_lins) != 1 or len(v_lins) != 1 or o_node is None:
        unidentified.append(f"attention near {where}: q/k/v/o projections not found; left dense")
        return None
    q_lin, k_lin, v_lin, o_lin = (linears[q_lins[0]], linears[k_lins[0]], linears[v_lins[0]],
                                  linears[o_node])
    q_val = env[q_n]
    n_heads, head_dim = q_val.shape[1], q_val.shape[-1]
    try:
        rows, ratio = _rows_per_head(env, q_n, q_lins[0], n_heads)
        q_rows, _ = _group_rows(rows, ratio, n_heads, head_dim)
        k_heads = env[k_n].shape[1]
        krows, kratio = _rows_per_head(env, k_n, k_lins[0], k_heads)
        vrows, vratio = _rows_per_head(env, v_n, v_lins[0], env[v_n].shape[1])
        n_kv = len(set(torch.round(kratio * 1000).tolist()))
        k_rows, k_keys = _group_rows(krows, kratio, n_kv, head_dim)
        v_rows, _ = _group_rows(vrows, vratio, n_kv, head_dim)
        o_cols = _o_columns(env, out_n, o_lin, n_heads, head_dim)
    except RuntimeError as e:  # a probe that cannot run means we do not understand the layout
        unidentified.append(f"attention at {where}: probing failed ({e}); left dense")
        return None
    ok = q_rows is not None and k_rows is not None and v_rows is not None and o_cols is not None
    if ok and n_heads % n_kv == 0 and k_heads == n_heads and n_kv != n_heads:
        # k was expanded to one copy per query head (repeat_kv): group g must be the mean label
        # of heads [g*per, (g+1)*per) — the contiguous grouping every kernel assumes.
        per = n_heads // n_kv
        expect = [sum(range(g * per + 1, (g + 1) * per + 1)) / per for g in range(n_kv)]
        ok = all(abs(a - b) < 1e-3 for a, b in zip(k_keys, expect))
    if not ok or n_heads % n_kv:
        unidentified.append(f"attention at {where}: head layout did not probe cleanly; left dense")
        return None
    module = _common_prefix([q_lin.module, k_lin.module, v_lin.module, o_lin.module])
    info = AttentionInfo(module, q_lin.module, k_lin.module, v_lin.module, o_lin.module,
                         int(n_heads), int(n_kv), int(head_dim), q_rows, k_rows, v_rows, o_cols,
                         q_lin.layout)
    return info, {q_lins[0], k_lins[0], v_lins[0], o_node}


def _identify_ffn(env, linears, d_node, used):
    d = linears[d_node]
    x_in = d_node.args[0] if d.layout == "out_in" else d_node.args[1]
    ups, seen = _walk_back(x_in, linears)
    if not ups or len(ups) > 2 or any(u in used for u in ups):
        return None
    ins = {(u.args[0] if linears[u].layout == "out_in" else u.args[1]) for u in ups}
    if len(ins) != 1:
        return None
    if any(linears[u].out_features != d.in_features or linears[u].in_features != d.out_features
           for u in ups):
        return None
    if any(n.op == "call_function" and n.target not in ELEMENTWISE and n not in ups
           for n in seen):
        return None
    # the gate is the input linear whose path to the down projection passes an activation
    act_of = {}
    for u in ups:
        acts = [_activation_name(n) for n in _path_nodes(u, x_in) if n.target in ACTIVATIONS]
        act_of[u] = acts
    gated = len(ups) == 2
    if gated:
        with_act = [u for u in ups if act_of[u]]
        if len(with_act) != 1:
            return None
        gate = with_act[0]
        up = next(u for u in ups if u is not gate)
        acts = act_of[gate]
    else:
        gate, up, acts = None, ups[0], act_of[ups[0]]
    activation = "gelu_tanh" if "gelu_tanh" in acts else (acts[0] if acts else "unknown")
    if not _channels_identity(env, up, x_in, d.in_features):
        return None
    module = _common_prefix([linears[u].module for u in ups] + [d.module])
    info = FFNInfo(module, linears[up].module, d.module, linears[gate].module if gate else None,
                   int(d.in_features), activation, d.layout)
    return info, set(ups) | {d_node}


def _activation_name(node) -> str:
    if node.target == aten.gelu.default and node.kwargs.get("approximate") == "tanh":
        return "gelu_tanh"
    return ACTIVATIONS[node.target]


def _path_nodes(src, dst):
    """Nodes on some path src -> dst (forward), dst included."""
    fwd, queue = set(), deque([src])
    while queue:
        n = queue.popleft()
        for u in n.users:
            if u not in fwd:
                fwd.add(u)
                queue.append(u)
    _, back = _walk_back(dst, {})
    return [n for n in fwd & back if n.op == "call_function"]


def _channels_identity(env, up_node, x_in, width) -> bool:
    """Channel j of the up projection must feed channel j of the down input only."""
    x, y = env[up_node], env[x_in]
    labels = torch.arange(1, width + 1, dtype=y.dtype)
    g1 = _grad(y, x, torch.ones_like(y)).reshape(-1, width)
    gl = _grad(y, x, labels.expand_as(y)).reshape(-1, width)
    live = g1.abs() > 1e-8
    if live.float().mean() < 0.5:
        return False
    ratio = gl[live] / g1[live]
    expect = labels.expand_as(g1)[live]
    return bool(torch.allclose(ratio, expect, rtol=1e-3, atol=1e-3))


def _assemble_layers(attentions, ffns):
    """Group attention and FFN blocks by the residual block (layer module) they live in."""
    by_layer: dict[str, dict] = {}  # insertion order: graph order of each layer's attention
    for kind, found in (("attention", attentions), ("ffn", ffns)):
        for info, _ in found:
            key = _layer_module(info.module) or info.module
            by_layer.setdefault(key, {})[kind] = info
    return [LayerInfo(i, key, parts.get("attention"), parts.get("ffn"))
            for i, (key, parts) in enumerate(by_layer.items())]
