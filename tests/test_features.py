"""Polynomial features and coefficient families (docs/math.md#polynomial), all in float64."""
import itertools
import math

import pytest
import torch

from tensorattn.features import (
    chebyshev_coefficients,
    check_positive,
    degree_for,
    exp_coefficients,
    logit_bounds,
    max_rel_error,
    monomial_features,
    multi_indices,
    multinomial_weights,
    poly_eval,
    poly_min,
    rank,
    shift_coefficients,
    taylor_coefficients,
)

F64 = torch.float64


# ---------------------------------------------------------------- multi-indices and rank (docs/math.md#rank-table)
@pytest.mark.parametrize("d,g", [(1, 3), (2, 4), (3, 5), (4, 3)])
def test_multi_indices_graded_lex_order(d, g):
    ref = []
    for t in range(g + 1):
        for c in itertools.combinations_with_replacement(range(d), t):
            v = [0] * d
            for j in c:
                v[j] += 1
            ref.append(v)
    b = multi_indices(d, g)
    assert b.dtype == torch.long
    assert b.tolist() == ref
    assert len(ref) == math.comb(d + g, g) == rank(d, g)
    deg, mult = multinomial_weights(d, g)
    assert deg.tolist() == b.sum(1).tolist()
    for row, w in zip(ref, mult.tolist()):
        assert w == math.factorial(sum(row)) / math.prod(math.factorial(x) for x in row)


# (d, g) -> (monomial, paper-style C(3(g+d), 3g), kronecker powers); docs/math.md#rank-table
RANKS = {(2, 2): (6, 924, 7), (2, 4): (15, 18564, 31), (4, 2): (15, 18564, 21), (4, 4): (70, 2704156, 341),
         (4, 6): (210, 86493225, 5461), (8, 2): (45, 593775, 73), (8, 3): (165, 38567100, 585),
         (8, 4): (495, 1251677700, 4681), (8, 6): (3003, 353697121050, 299593)}


@pytest.mark.parametrize("dg", sorted(RANKS))
def test_rank_table(dg):
    d, g = dg
    mono, paper, kron = RANKS[dg]
    assert rank(d, g) == mono
    assert rank(d, g, order=3) == mono  # exact monomials: the rank does not depend on the order
    assert rank(d, g, kind="paper") == paper
    assert rank(d, g, kind="kronecker") == kron
    # docs/math.md#rank-table rounds the paper-style bound to 3 digits
    assert rank(d, g, order=1, kind="paper") == math.comb(2 * (g + d), 2 * g)


def test_rank_more_rows_of_the_table():
    assert [rank(3, g) for g in (2, 4, 6, 8, 10)] == [10, 35, 84, 165, 286]
    assert [rank(16, g) for g in (2, 4, 6, 8)] == [153, 4845, 74613, 735471]
    assert [rank(64, g) for g in (2, 4)] == [2145, 814385]


# ---------------------------------------------------------------- monomial features
def test_monomial_features_are_the_monomials():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=F64)
    feats = monomial_features(x, 4)
    beta = multi_indices(3, 4)
    ref = torch.prod(x[:, None, :] ** beta[None].to(F64), -1)  # [5, k]
    torch.testing.assert_close(feats, ref, rtol=1e-13, atol=1e-14)
    assert feats.shape == (5, 35)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_multinomial_identity_gives_powers_of_the_logit(order):
    # sum_β w_β a^β prod_r k_r^β = sum_t γ_t <a, k_1 ∘ ... ∘ k_m>^t: the polynomial method's identity
    torch.manual_seed(order)
    d, g = 4, 5
    a = torch.randn(6, d, dtype=F64)
    ks = [torch.randn(7, d, dtype=F64) for _ in range(order)]
    gamma = torch.randn(g + 1, dtype=F64)
    deg, mult = multinomial_weights(d, g)
    ua = monomial_features(a, g) * mult * gamma[deg]  # [6, k]
    prod_k = ks[0]
    feat_k = monomial_features(ks[0], g)
    for k in ks[1:]:
        prod_k = (prod_k[:, None, :] * k[None, :, :]).reshape(-1, d)  # Khatri-Rao over key indices
        feat_k = (feat_k[:, None, :] * monomial_features(k, g)[None, :, :]).reshape(-1, feat_k.shape[-1])
    z = a @ prod_k.T  # [6, 7^m]
    torch.testing.assert_close(ua @ feat_k.T, poly_eval(gamma, z), rtol=1e-11, atol=1e-11)


def test_monomial_features_autograd_and_batch_dims():
    x = torch.randn(2, 3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: monomial_features(t, 3), (x,))
    assert monomial_features(x, 0).shape == (2, 3, 1)


# ---------------------------------------------------------------- coefficient families and degrees
# radius -> degrees for eps = 1e-3 / 1e-6 / 1e-9 (docs/math.md#degree)
TAYLOR = {0.5: (4, 7, 9), 1.0: (6, 9, 12), 2.0: (10, 14, 17), 4.0: (17, 21, 25)}
CHEB = {0.5: (3, 6, 8), 1.0: (5, 7, 10), 2.0: (7, 10, 13), 4.0: (11, 15, 18)}


@pytest.mark.parametrize("family,table", [("taylor", TAYLOR), ("chebyshev", CHEB)])
def test_degree_table(family, table):
    for radius, degrees in table.items():
        for eps, g in zip((1e-3, 1e-6, 1e-9), degrees):
            got = degree_for(radius, eps, family)
            assert got == g, (family, radius, eps, got)
            # it is the smallest: one degree less misses eps
            assert max_rel_error(exp_coefficients(g, family, radius), radius) <= eps
            assert max_rel_error(exp_coefficients(g - 1, family, radius), radius) > eps


def test_degree_for_positive_taylor_is_even():
    assert degree_for(1.0, 1e-6, "taylor", positive=True) == 10  # 9 is the smallest, 10 the smallest even
    assert degree_for(1.0, 1e-3, "taylor", positive=True) == 6
    assert degree_for(0.0, 1e-6, "taylor", positive=True) == 0


def test_taylor_errors_match_spec():
    assert max_rel_error(taylor_coefficients(8), 1.0) == pytest.approx(6.8e-6, rel=0.01)
    assert max_rel_error(taylor_coefficients(6), 0.5) == pytest.approx(2.4e-6, rel=0.01)
    # the remainder bound R^{g+1} e^{2R} / (g+1)! (docs/math.md#degree) holds
    assert max_rel_error(taylor_coefficients(8), 1.0) <= math.e ** 2 / math.factorial(9)


def test_taylor_positivity():
    # even Taylor polynomials of exp are > 0 on R (minimum ~0.5, 0.27, 0.15); odd ones are not
    for g, m in ((2, 0.5), (4, 0.2704), (6, 0.1493)):
        assert poly_min(taylor_coefficients(g), 30.0) == pytest.approx(m, abs=1e-3)
    assert poly_min(taylor_coefficients(3), 30.0) < -4000
    with pytest.raises(ValueError, match="degree must be even"):
        check_positive(taylor_coefficients(3), 3, "taylor", 1.0)
    err, lo = check_positive(taylor_coefficients(4), 4, "taylor", 1.0)
    assert lo > 0 and err < 0.025  # Taylor g=4 on [-1, 1]: 1.9e-2 at z = -1


def test_chebyshev_interpolates_at_chebyshev_nodes():
    g, r = 6, 2.0
    c = chebyshev_coefficients(g, r)
    nodes = r * torch.cos(math.pi * (torch.arange(g + 1, dtype=F64) + 0.5) / (g + 1))
    torch.testing.assert_close(poly_eval(c, nodes), torch.exp(nodes), rtol=1e-12, atol=0)
    # better than Taylor of the same degree on the same interval
    assert max_rel_error(c, r) < max_rel_error(taylor_coefficients(g), r) / 10


def test_chebyshev_fit_that_dips_is_refused():
    c = chebyshev_coefficients(4, 4.0)  # minimum about -0.53 on [-4, 4]
    assert poly_min(c, 4.0) < 0
    with pytest.raises(ValueError, match="minimum on the logit interval"):
        check_positive(c, 4, "chebyshev", 4.0)
    check_positive(chebyshev_coefficients(11, 4.0), 11, "chebyshev", 4.0)
    assert degree_for(4.0, 0.9, "chebyshev", positive=True) >= 6


def test_degree_for_refuses_huge_radius():
    with pytest.raises(ValueError, match="radius is too large"):
        degree_for(40.0, 1e-9, "taylor", max_degree=40)


def test_bad_input():
    with pytest.raises(ValueError, match="eps"):
        degree_for(1.0, 0.0)
    with pytest.raises(ValueError, match="eps"):
        degree_for(1.0, 1.5)
    with pytest.raises(TypeError, match="eps"):
        degree_for(1.0, "1e-3")
    with pytest.raises(ValueError, match="radius"):
        degree_for(-1.0, 1e-3)
    with pytest.raises(ValueError, match="radius"):
        degree_for(float("inf"), 1e-3)
    with pytest.raises(ValueError, match="family"):
        degree_for(1.0, 1e-3, "legendre")
    with pytest.raises(ValueError, match="degree"):
        multi_indices(3, -1)
    with pytest.raises(TypeError, match="degree"):
        monomial_features(torch.ones(2, 3), 2.0)
    with pytest.raises(ValueError, match="d must be >= 1"):
        rank(0, 2)
    with pytest.raises(ValueError, match="kind"):
        rank(2, 2, kind="tensor")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        monomial_features([1.0, 2.0], 2)
    with pytest.raises(TypeError, match="floating-point"):
        monomial_features(torch.ones(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="radius"):
        exp_coefficients(3, "chebyshev")


# ---------------------------------------------------------------- per-row bounds and re-centring
@pytest.mark.parametrize("order", [1, 2, 3])
def test_logit_bounds_contain_every_logit(order):
    torch.manual_seed(10 + order)
    d = 3
    q = torch.randn(9, d, dtype=F64)
    ks = [torch.randn(5, d, dtype=F64) + (1.5 if r == 0 else 0.0) for r in range(order)]
    scale = 0.37
    prod_k = ks[0]
    for k in ks[1:]:
        prod_k = (prod_k[:, None, :] * k[None]).reshape(-1, d)
    z = scale * q @ prod_k.T  # [9, 5^m]
    lo, hi = logit_bounds(q, ks, scale)
    assert lo.dtype == F64 and lo.shape == (9,)
    assert bool((z >= lo[:, None] - 1e-12).all()) and bool((z <= hi[:, None] + 1e-12).all())
    # never looser than the symmetric bound sum_l |q_il| prod_r max|k_r[:, l]|
    sym = scale * q.abs() @ torch.stack([k.abs().max(0).values for k in ks]).prod(0)
    assert bool((hi - lo <= 2 * sym + 1e-12).all())


def test_logit_bounds_one_sided_for_positive_keys():
    q = torch.tensor([[1.0, 2.0]], dtype=F64)
    k1 = torch.tensor([[1.0, 1.0], [2.0, 3.0]], dtype=F64)
    lo, hi = logit_bounds(q, [k1, k1], 1.0)
    assert lo.item() == pytest.approx(1.0 + 2.0) and hi.item() == pytest.approx(4.0 + 18.0)


def test_shift_coefficients():
    torch.manual_seed(3)
    c = chebyshev_coefficients(7, 1.5)
    m = torch.tensor([-1.0, 0.0, 0.3, 2.0], dtype=F64)
    z = torch.linspace(-3, 3, 50, dtype=F64)
    shifted = shift_coefficients(c, m)  # [4, 8]
    got = poly_eval(shifted[:, None, :], z[None, :].expand(4, 50))  # row i uses centre m_i
    torch.testing.assert_close(got, poly_eval(c, z[None] - m[:, None]), rtol=1e-11, atol=1e-11)
