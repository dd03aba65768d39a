"""Patch info mining against a plain per-token, per-candidate loop (the formula of DESIGN.md 1.2)."""
import math

import pytest
import torch

from mini_gemini.modeling.mining import PatchInfoMining, windows

SIDE, P, C, CA = 3, 2, 8, 6   # 3 x 3 LR tokens, each mining a 2 x 2 window of a 6 x 6 HR map


def loop_mining(m: PatchInfoMining, x, hr):
    """One token and one candidate at a time; NaN logits count as 0 (official nan_to_num)."""
    b, n, c = x.shape
    side = math.isqrt(n)
    p = hr.shape[-1] // side
    out = torch.empty_like(x)
    weights = torch.empty(b, n, p * p)
    for bi in range(b):
        for t in range(n):
            r0, c0 = (t // side) * p, (t % side) * p
            q = m.query(x[bi, t])
            logits, values = [], []
            for cand in range(p * p):
                h = hr[bi, :, r0 + cand // p, c0 + cand % p]
                logit = float(q @ m.key(h)) / math.sqrt(c)
                logits.append(0.0 if math.isnan(logit) else logit)
                values.append(m.value(h))
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            a = [v / sum(e) for v in e]
            weights[bi, t] = torch.tensor(a)
            out[bi, t] = x[bi, t] + sum(ai * v for ai, v in zip(a, values))
    return out, weights


@pytest.fixture
def mining():
    torch.manual_seed(0)
    m = PatchInfoMining(C, CA).eval()
    with torch.no_grad():  # non-trivial LayerNorms and sharper attention than the default init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        m.query[1].weight.mul_(4)
    return m


@torch.no_grad()
def test_matches_loop_and_weights_sum_to_one(mining):
    torch.manual_seed(1)
    x, hr = torch.randn(2, SIDE * SIDE, C), torch.randn(2, CA, SIDE * P, SIDE * P)
    tokens, attn = mining(x, hr)
    ref_tokens, ref_attn = loop_mining(mining, x, hr)
    assert tokens.shape == (2, SIDE * SIDE, C) and attn.shape == (2, SIDE * SIDE, P * P)
    torch.testing.assert_close(attn, ref_attn, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, SIDE * SIDE))
    assert attn.std() > 0.05  # the test is only worth something if attention is far from uniform


@torch.no_grad()
def test_nan_logits_become_zero(mining):
    torch.manual_seed(2)
    x, hr = torch.randn(1, SIDE * SIDE, C), torch.randn(1, CA, SIDE * P, SIDE * P)
    hr[0, :, 1, 2] = float("inf")  # token 1 (row 0, col 1), candidate (1, 0) -> NaN key and logit
    _, attn = mining(x, hr)
    _, ref_attn = loop_mining(mining, x, hr)
    assert torch.isfinite(attn).all()
    torch.testing.assert_close(attn, ref_attn, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, SIDE * SIDE))
    # the NaN candidate got logit 0: its weight is exp(0 - lse) of the others
    q = mining.query(x[0, 1])
    logits = [0.0 if c == 2 else float(q @ mining.key(hr[0, :, c // P, P + c % P])) / math.sqrt(C) for c in range(4)]
    assert attn[0, 1, 2] == pytest.approx(torch.tensor(logits).softmax(0)[2].item(), rel=1e-5)

    # every logit NaN (a NaN query): uniform weights, as softmax of zeros
    with torch.no_grad():
        mining.query[1].bias[0] = float("nan")
    _, attn = mining(x, torch.randn(1, CA, SIDE * P, SIDE * P))
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / (P * P)))


@pytest.mark.parametrize("r,c", [(0, 0), (5, 5), (2, 3), (4, 1), (1, 4)])
def test_window_geometry(r, c):
    hr = torch.zeros(1, CA, SIDE * P, SIDE * P)
    hr[0, :, r, c] = torch.arange(1, CA + 1, dtype=torch.float)
    w = windows(hr, SIDE)                                     # (1, N, P*P, CA)
    assert w.shape == (1, SIDE * SIDE, P * P, CA)
    hits = (w != 0).any(-1).nonzero().tolist()
    assert hits == [[0, (r // P) * SIDE + c // P, (r % P) * P + c % P]]
    assert w[0, (r // P) * SIDE + c // P, (r % P) * P + c % P].tolist() == list(range(1, CA + 1))


def test_mining_in_chunks_of_rows_equals_the_loop():
    """A grid wider than one chunk (12 x 12 = 144 tokens; chunks of 5, 5 and 2 rows): every token is mined from its
    own window, in order, as if all were mined at once."""
    from mini_gemini.modeling.mining import CHUNK_TOKENS
    side = 12
    assert side * side > CHUNK_TOKENS and side % (CHUNK_TOKENS // side) != 0  # several chunks, the last one short
    torch.manual_seed(1)
    m = PatchInfoMining(C, CA).eval()
    x, hr = torch.randn(2, side * side, C), torch.randn(2, CA, side * P, side * P)
    with torch.no_grad():
        out, attn = m(x, hr)
        want_out, want_attn = loop_mining(m, x, hr)
    torch.testing.assert_close(attn, want_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)


def test_windows_of_some_rows_are_those_rows_of_the_whole_map():
    hr = torch.randn(1, CA, SIDE * P, SIDE * P)
    whole = windows(hr, SIDE)
    assert torch.equal(windows(hr[:, :, P:3 * P], SIDE), whole[:, SIDE:3 * SIDE])
