"""One decode step of a Llama-family model without the Hugging Face layer plumbing.

A decode step at batch 1..16 is a few hundred small ops. transformers' generic forward adds
kwarg-deprecation wrappers, mask builders and output records around each of them: ~30 ms a
step for SmolLM2 on a 2-core CPU, more than the per-token path's kernels take. `decode_logits`
runs the model's own modules (the per-token path's swapped projections, FFNs and head among
them, so the operators have one implementation) in a plain loop: RMSNorm (fused), RoPE from the
model's rotary module, the cache's own `update`, SDPA. It is what the per-token path's decode steps
run where `supports(model)` holds; anything else (other families, sliding-window layers)
keeps `model(...)`. tests/test_decode_step.py checks it equals the HF forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels as K

# Families whose decoder layer is exactly: x += o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)));
# x += mlp(n2 x), with RMSNorm and rotate-half RoPE (Qwen2's q/k/v biases live in the modules).
FAMILIES = ("llama", "mistral", "qwen2")


def supports(model) -> bool:
    """Whether decode_logits computes what model(...) does for this model."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in FAMILIES:
        return False
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm",
                                                          "rotary_emb")):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False  # sliding-window layers need their own masks
    if getattr(cfg, "model_type") == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    norms = [base.norm] + [n for layer in base.layers
                           for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return all(hasattr(layer.self_attn, "head_dim") for layer in base.layers) and all(
        hasattr(n, "variance_epsilon") and n.weight.dim() == 1 for n in norms)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused op (its module is six small ones)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@torch.no_grad()
def decode_logits(model, input_ids: torch.Tensor, cache, attention_mask=None,
                  position_ids=None, kernels: bool = False) -> torch.Tensor:
    """Logits [B, 1, vocab] of one new token per row, appending its K/V to `cache`.

    attention_mask [B, past + 1] (1 = attend) hides left padding of a batch; position_ids
    [B, 1] default to the cache length (every row unpadded). kernels: a float32 CPU model's
    unmasked batch-1 step runs RMSNorm, RoPE and attention on runtime.cpu_kernels (one call
    each instead of 5-15 torch ops; the per-token path's CPU backend sets it)."""
    base = model.model
    x = base.embed_tokens(input_ids)
    b = x.shape[0]
    if position_ids is None:
        position_ids = torch.full((b, 1), cache.get_seq_length(), dtype=torch.long,
                                  device=x.device)
    cos, sin = base.rotary_emb(x, position_ids)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = attention_mask.bool()[:, None, None, :]
    if kernels and b == 1 and mask is None and x.dtype == torch.float32 and x.is_cpu:
        return _row_step(model, x, cache, cos.reshape(-1).contiguous(),
                         sin.reshape(-1).contiguous())
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1 head, 1, head_dim]
    for li, layer in enumerate(base.layers):
        attn = layer.self_attn
        d = attn.head_dim
        h = _norm(layer.input_layernorm, x)
        q = attn.q_proj(h).view(b, 1, -1, d).transpose(1, 2)
        k = attn.k_proj(h).view(b, 1, -1, d).transpose(1, 2)
        v = attn.v_proj(h).view(b, 1, -1, d).transpose(1, 2)
        k, v = cache.update(_rope(k, cos, sin), v, li)
        o = F.scaled_dot_product_attention(_rope(q, cos, sin), k, v, attn_mask=mask,
                                           scale=attn.scaling,
                                           enable_gqa=k.shape[1] != q.shape[1])
        x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
        x = x + layer.mlp(_norm(layer.post_attention_layernorm, x))
    return model.lm_head(_norm(base.norm, x))


def _row_step(model, x: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor):
    """decode_logits' loop for one unmasked row [1, 1, hidden] with the norms, RoPE and
    attention on the CPU kernels (the same numbers up to float summation order)."""
    base = model.model
    for li, layer in enumerate(base.layers):
        attn = layer.self_attn
        d = attn.head_dim
        h = _norm_k(layer.input_layernorm, x)
        q = K.rope(attn.q_proj(h).reshape(-1, d), cos, sin)
        k = K.rope(attn.k_proj(h).reshape(-1, d), cos, sin)
        v = attn.v_proj(h).reshape(1, -1, 1, d)
        keys, values = cache.update(k.view(1, -1, 1, d), v, li)
        o = K.attention_row(q, keys[0], values[0], attn.scaling)
        x = x + attn.o_proj(o.view(1, 1, -1))
        x = x + layer.mlp(_norm_k(layer.post_attention_layernorm, x))
    return model.lm_head(_norm_k(base.norm, x))


def _norm_k(norm, x: torch.Tensor) -> torch.Tensor:
    return K.rms_norm(x, norm.weight.detach(), norm.variance_epsilon)
