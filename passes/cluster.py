"""Task classes: k-means over prompt signatures, k chosen by silhouette.

Signatures are compared by their *relative* pattern: each unit's score is divided by its
mean over the build prompts and log1p-compressed, the column mean is removed, and each row
is L2-normalised (so k-means on them is close to cosine clustering). Task labels from the
calibration file never influence the clustering; `alignment` only reports how well the
found classes match them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

from cscompile.errors import UserInputError

N_INIT = 10


@dataclass
class Clustering:
    labels: np.ndarray  # [P] class id per build prompt
    centroids: np.ndarray  # [k, N] in the transformed space
    k: int
    silhouette: dict[int, float] = field(default_factory=dict)  # score per candidate k
    unit_scale: np.ndarray | None = None  # per-unit mean of the build signatures
    center: np.ndarray | None = None  # column mean of the transformed build signatures

    def transform(self, signatures: np.ndarray) -> np.ndarray:
        return _transform(signatures, self.unit_scale, self.center)

    def predict(self, signatures: np.ndarray) -> np.ndarray:
        """Nearest-centroid class of new prompts' signatures (e.g. held-out prompts)."""
        x = self.transform(signatures)
        d = ((x[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return d.argmin(1)


def _transform(sig, scale, center):
    x = np.log1p(np.asarray(sig, dtype=np.float64) / scale)
    x = x - center
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster(signatures: np.ndarray, n_classes: int | None = None, max_classes: int = 6,
            seed: int = 0) -> Clustering:
    """Cluster [P, N] signatures into `n_classes` (or the silhouette-best k in [2, max])."""
    sig = np.asarray(signatures, dtype=np.float64)
    n = len(sig)
    if n_classes is not None and not 1 <= n_classes <= n:
        raise UserInputError(f"cannot make {n_classes} classes from {n} build prompts")
    scale = np.maximum(sig.mean(0), 1e-12)
    x0 = np.log1p(sig / scale)
    center = x0.mean(0)
    x = _transform(sig, scale, center)

    fits, scores = {}, {}
    candidates = [n_classes] if n_classes else list(range(2, min(max_classes, n - 1) + 1))
    if not candidates:
        raise UserInputError(f"need at least 3 build prompts to choose a number of classes, "
                             f"got {n}; pass a fixed number of classes")
    for k in candidates:
        km = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(x)
        fits[k] = km
        if 2 <= k <= n - 1 and len(set(km.labels_)) > 1:
            scores[k] = float(silhouette_score(x, km.labels_))
    best = n_classes or max(scores, key=lambda k: (scores[k], -k))
    labels = _canonical(fits[best].labels_)
    centroids = np.stack([x[labels == c].mean(0) for c in range(best)])
    return Clustering(labels, centroids, best, scores, scale, center)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber classes by first appearance, so class ids do not depend on k-means' order."""
    order = {}
    for lab in labels:
        order.setdefault(int(lab), len(order))
    return np.array([order[int(lab)] for lab in labels])


def alignment(labels, tasks) -> dict | None:
    """How well the classes match the calibration `task` labels: ARI and purity (reporting only)."""
    pairs = [(int(lab), t) for lab, t in zip(labels, tasks) if t is not None]
    if not pairs:
        return None
    labs, ts = zip(*pairs)
    by_class: dict[int, Counter] = {}
    for lab, t in pairs:
        by_class.setdefault(lab, Counter())[t] += 1
    purity = sum(c.most_common(1)[0][1] for c in by_class.values()) / len(pairs)
    return {"ari": float(adjusted_rand_score(ts, labs)), "purity": float(purity),
            "tasks_per_class": {str(k): dict(sorted(v.items()))
                                for k, v in sorted(by_class.items())}}
