"""PNG plots of build results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import numpy as np


def support_heatmap(bundle_path, out_png) -> None:
    """Per class and layer, the fraction of heads and FFN channels each class support keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bundle import load_bundle
    from .structure import StructureMap

    bundle = load_bundle(bundle_path)
    smap = StructureMap.from_json(bundle.manifest["structure"])
    classes = bundle.manifest["classes"]
    n_layers = smap.n_layers
    heads = np.zeros((len(classes), n_layers))
    chans = np.zeros((len(classes), n_layers))
    for c, cls in enumerate(classes):
        sup = cls["support"]
        kept = set(range(n_layers)) if sup["layers"] is None else set(sup["layers"])
        for li, layer in enumerate(smap.layers):
            if li not in kept:
                continue
            if layer.attention is not None:
                heads[c, li] = len(sup["heads"].get(str(li), range(layer.attention.n_heads))) \
                    / layer.attention.n_heads
            if layer.ffn is not None:
                chans[c, li] = len(sup["channels"].get(str(li), range(layer.ffn.width))) \
                    / layer.ffn.width
    fig, axes = plt.subplots(2, 1, figsize=(max(6, n_layers * 0.35), 1.2 + 0.9 * len(classes)),
                             constrained_layout=True)
    for ax, data, title in ((axes[0], heads, "query heads kept"),
                            (axes[1], chans, "FFN channels kept")):
        im = ax.imshow(data, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{bundle.manifest['source'].get('model_id')}: {title} (fraction per layer)")
        ax.set_xlabel("layer")
        ax.set_ylabel("class")
        ax.set_yticks(range(len(classes)))
        fig.colorbar(im, ax=ax)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
