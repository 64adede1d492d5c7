"""Golden-value tests of the pure rules on hand-built inputs."""
import numpy as np
import pytest

from bunny.select import bound, rules
from bunny.select.assign import Assigner
from bunny.select.windows import Window, key_at

from selhelp import unit


def test_chain_joins_only_through_middle():
    # a.b and b.c are 0.9 but a.c is 0.62: one component only because of b
    ang = np.arccos(0.9)
    x = unit([[1, 0, 0], [np.cos(ang), np.sin(ang), 0], [np.cos(2 * ang), np.sin(2 * ang), 0],
              [0, 0, 1]]).astype(np.float32)
    assert x[0] @ x[2] < 0.86
    labels = rules.components(x, 0.86)
    assert list(labels) == [0, 0, 0, 3]
    # without the middle point, the ends are apart
    assert list(rules.components(x[[0, 2, 3]], 0.86)) == [0, 1, 2]
    # upper median of the 3-member chain sorted by distance to the centroid (ends nearest)
    c = np.array([1.0, 0.3, 0.0])
    dist = rules.centroid_distance(x, c)
    keep = rules.keep_upper_median(labels, dist, np.arange(4))
    order = np.argsort(dist[:3])
    assert keep[3] and keep[order[1]] and keep.sum() == 2


def test_exact_duplicates_tie_on_distance_and_gid_decides():
    v = unit(np.random.default_rng(0).normal(size=(1, 64))).astype(np.float16).astype(np.float32)
    x = np.repeat(v, 4, axis=0)
    gid = np.array([40, 10, 30, 20])
    dist = rules.centroid_distance(x, np.random.default_rng(1).normal(size=64))
    assert len(set(dist)) == 1  # identical rows tie exactly
    labels = rules.components(x, 0.86)
    assert len(set(labels)) == 1
    keep = rules.keep_upper_median(labels, dist, gid)
    assert gid[keep].tolist() == [30]  # sorted gids 10,20,30,40 -> position 2


def test_singletons_all_kept():
    x = np.eye(5, dtype=np.float32)
    labels = rules.components(x, 0.86)
    assert list(labels) == [0, 1, 2, 3, 4]
    assert rules.keep_upper_median(labels, np.zeros(5), np.arange(5)).all()


def test_threshold_is_strict():
    ang = np.arccos(0.5)
    x = np.array([[1, 0], [np.cos(ang), np.sin(ang)]], np.float32)
    dot = rules.pair_dots(x, np.array([0]), np.array([1]))[0]
    assert len(set(rules.components(x, dot))) == 2  # equal to threshold: no edge
    assert len(set(rules.components(x, np.nextafter(dot, -1)))) == 1


def test_components_match_bfs_on_random_graphs():
    rng = np.random.default_rng(3)
    for trial in range(5):
        n = 300
        x = unit(rng.normal(size=(8, 24))[rng.integers(8, size=n)] + 0.25 * rng.normal(size=(n, 24))).astype(np.float32)
        labels = rules.components(x, 0.8, block=64)
        adj = x.astype(np.float64) @ x.astype(np.float64).T > 0.8
        # same partition as the transitive closure
        reach = adj.copy()
        for _ in range(10):
            reach = (reach.astype(np.int32) @ reach.astype(np.int32)) > 0
        assert np.array_equal(labels[:, None] == labels[None, :], reach | np.eye(n, dtype=bool))


def test_collapse_identical_keeps_order():
    x = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [2, 2]], np.float32)
    first, inv = rules.collapse_identical(x)
    assert first.tolist() == [0, 1, 4] and inv.tolist() == [0, 1, 0, 1, 2]


def test_semdedup_rule_matches_definition():
    rng = np.random.default_rng(5)
    x = unit(rng.normal(size=(3, 16))[rng.integers(3, size=80)] + 0.2 * rng.normal(size=(80, 16))).astype(np.float32)
    x[10] = x[11]
    gid = np.arange(80) * 3
    c = x.mean(0)
    dist = rules.centroid_distance(x, c)
    keep = rules.keep_semdedup(x, dist, gid, eps=0.1)
    rank = np.lexsort((gid, -dist))
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    expect = np.ones(80, bool)
    for pos, r in enumerate(rank):
        if (sim[rank[:pos], r] > 0.9).any():
            expect[r] = False
    assert np.array_equal(keep, expect)
    assert keep[[10, 11]].sum() <= 1  # identical rows never both survive


def test_window_rule_boundaries():
    assert rules.window(10, 0.4, 0.6) == (4, 6)
    assert rules.window(20, 0.15, 0.35) == (3, 7)  # 0.35*20 = 7.000000000000001
    assert rules.window(3, 0.4, 0.6) == (1, 1)  # empty: int(1.2) == int(1.8)
    assert rules.window(7, 0.0, 1.0) == (0, 7)


@pytest.mark.parametrize("cap", [1, 3, 1 << 20])
def test_window_exact_with_ties_and_radix_passes(cap):
    rng = np.random.default_rng(0)
    score = rng.choice(np.array([0.1, 0.2, 0.2, -0.0, 0.0, 0.5], np.float32), size=97)
    gid = rng.permutation(1000)[:97].astype(np.int64)
    key = (rules.desc_key(score), gid.astype(np.uint64))

    def stream():  # two chunks, to check chunking does not matter
        yield key[0][:40], key[1][:40]
        yield key[0][40:], key[1][40:]

    order = np.lexsort((gid, -score.astype(np.float64)))
    for lo, hi in [(0.4, 0.6), (0.15, 0.35), (0.0, 1.0), (0.5, 0.5)]:
        a, b = rules.window(97, lo, hi)
        w = Window(stream, (32, 64), 97, a, b, cap=cap)
        assert set(gid[w.mask(key)]) == set(gid[order[a:b]])
    assert key_at(stream, (32, 64), 97, 0, cap) == (int(key[0][order[0]]), int(gid[order[0]]))


def test_draw_hash_is_pure_and_spread():
    g = np.arange(10000)
    h = rules.draw_hash(g, 7)
    assert np.array_equal(h[5000:], rules.draw_hash(g[5000:], 7))  # split-independent
    assert not np.array_equal(h, rules.draw_hash(g, 8))
    keep = np.argsort(h)[:1000]
    assert 400 < (keep < 5000).sum() < 600


def test_assignment_ties_go_to_lower_index():
    c = np.array([[0, 1], [1, 0], [1, 0], [0, -1]], np.float32)
    x = np.array([[1, 0], [0.6, 0.8], [np.sqrt(0.5), np.sqrt(0.5)]], np.float32)
    assert Assigner(c)(x).tolist() == [1, 0, 0]


def test_select_hot_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, bunny.select.engine, bunny.select.cli, bunny.select.report; "
            "print('torch' in sys.modules or 'bunny.model' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("block", [0, 7, 64])
def test_tiles_cover_the_upper_triangle_exactly_once(block):
    """Tiles of `block` rows x 4*block columns: every pair i < j is looked at once, so the
    edges (with and without the pruning bound) are those of the float64 matrix."""
    rng = np.random.default_rng(11)
    x = unit(rng.normal(size=(4, 12))[rng.integers(4, size=301)] + 0.5 * rng.normal(size=(301, 12))).astype(np.float32)
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    iu = np.triu_indices(len(x), 1)
    want = sorted(zip(*(a[sim[iu] > 0.86] for a in iu)))
    assert 100 < len(want) < len(iu[0]) // 2
    for edges in (rules.dense_edges(x, 0.86, block=block),
                  bound.bounded_edges(x, 0.86, bound.bound_plan(x, 0.86, rank=5), block=block)):
        got = [(int(i), int(j)) for a, b in edges for i, j in zip(a, b)]
        assert sorted(got) == want and len(set(got)) == len(got)


def test_collapse_identical_survives_hash_collisions(monkeypatch):
    """Rows are grouped by a 64-bit hash and then compared bytewise: when every row hashes
    alike, the bytewise fallback still gives the exact groups."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6)).astype(np.float32)[rng.integers(50, size=200)]
    want = rules.collapse_identical(x)
    monkeypatch.setattr(rules, "_HASH_MULT", np.zeros(4, np.uint64))
    got = rules.collapse_identical(x)
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    first, inv = got
    assert np.array_equal(x[first][inv], x) and len(first) == len(np.unique(x, axis=0))


def _one_row(f, *rows):
    """f on each row alone (a (1, d) array), stacked: the value with no chunk around it."""
    return np.concatenate([f(*(r[i:i + 1] for r in rows)) for i in range(len(rows[0]))])


def test_per_row_values_do_not_depend_on_chunking():
    """row_dots / centroid_distance / centroid_cosine work in chunks of _ROWS rows; each
    row's value is the one it gets alone, bit for bit, and within float64 rounding of the
    exact value."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 3 * rules._ROWS + 5, 40)).astype(np.float32)
    c = rng.normal(size=40).astype(np.float32)
    a64, b64, c64 = a.astype(np.float64), b.astype(np.float64), c.astype(np.float64)
    assert np.array_equal(rules.row_dots(a, b), _one_row(rules.row_dots, a, b))
    assert np.array_equal(rules.row_dots(a, b), (a64 * b64).sum(axis=1).astype(np.float32))
    dist = rules.centroid_distance(a, c)
    assert np.array_equal(dist, _one_row(lambda r: rules.centroid_distance(r, c), a))
    np.testing.assert_allclose(dist, np.sqrt(((a64 - c64) ** 2).sum(axis=1)), rtol=1e-14)
    chat = c64 / np.linalg.norm(c64)
    assert np.array_equal(rules.centroid_cosine(a, c), (a64 * chat).sum(axis=1).astype(np.float32))
    assert np.array_equal(rules.row_dots(a[7:8], b[7:8]), rules.row_dots(a, b)[7:8])
    rows = np.arange(1, len(a), 3)
    clip, cos = rules.clip_and_cosine(a, b[rows], c, rows)
    assert np.array_equal(clip, rules.row_dots(a, b[rows], rows))
    assert np.array_equal(cos, rules.centroid_cosine(a, c, rows))


def test_row_sums_do_not_depend_on_alignment():
    """`_dot64` (einsum) sums a row the same way at any address: the per-row values above
    come from rows gathered into fresh arrays, whose alignment varies."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(2, 50, 768))
    c = rng.normal(size=768)
    want_ab, want_ac = rules._dot64(a, b), rules._dot64(a, c)
    for shift in range(1, 8):  # float64 offsets 8..56 bytes into a buffer
        buf = np.empty(2 * a.size + 16)
        a2 = buf[shift:shift + a.size].reshape(a.shape)
        b2 = buf[shift + a.size:shift + 2 * a.size].reshape(b.shape)
        a2[:], b2[:] = a, b
        assert np.array_equal(rules._dot64(a2, b2), want_ab)
        assert np.array_equal(rules._dot64(a2, c), want_ac)
        assert np.array_equal(rules._dot64(a2[3:11], b2[3:11]), want_ab[3:11])
