"""Clustering signatures into classes; task labels only for alignment reporting."""
import numpy as np

from cscompile.passes.cluster import alignment, cluster


def _three_groups(per=6, n=40, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.dirichlet(np.ones(n), size=3)
    rows, tasks = [], []
    for g in range(3):
        for _ in range(per):
            rows.append(base[g] * rng.uniform(0.9, 1.1, n))
            tasks.append(f"t{g}")
    return np.array(rows), tasks


def test_silhouette_picks_true_k_and_aligns():
    sig, tasks = _three_groups()
    c = cluster(sig, max_classes=6, seed=0)
    assert c.k == 3
    assert set(c.silhouette) == {2, 3, 4, 5, 6}
    assert max(c.silhouette, key=c.silhouette.get) == 3
    a = alignment(c.labels, tasks)
    assert a["ari"] == 1.0 and a["purity"] == 1.0
    assert list(c.labels[:6]) == [0] * 6  # canonical numbering: first prompt is class 0


def test_fixed_k_deterministic_and_predict():
    sig, _ = _three_groups(seed=1)
    a = cluster(sig, n_classes=3, seed=7)
    b = cluster(sig, n_classes=3, seed=7)
    assert a.k == 3 and np.array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert np.array_equal(a.predict(sig), a.labels)  # build prompts land in their own class


def test_alignment_of_mixed_clusters():
    a = alignment([0, 0, 0, 1, 1, 1], ["x", "x", "y", "y", "y", None])
    assert a["purity"] == 4 / 5
    assert a["ari"] < 1.0
    assert alignment([0, 1], [None, None]) is None
