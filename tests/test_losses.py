"""Tests for pagoda.losses: distances, DiffAugment, discriminators, hinge, adaptive weight, distillation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.losses import (
    DEFAULT_DISTANCE, PSEUDO_HUBER_C, LossConfigError, RandomFeatureDistance, TeacherSampleCache, adaptive_weight,
    d_hinge_loss, generator_loss, diff_augment, g_hinge_loss, make_distance, pseudo_huber, pyramid,
)

OFFLINE = ["l2", "pseudo_huber", "multiscale", "features", "lite0"]


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """torch.allclose with a message (torch.testing.assert_close costs seconds on first use)."""
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), f"max |a - b| = {(a - b).abs().max()}"


# --- hinge -----------------------------------------------------------------------------------------

def test_hinge_hand_values():
    t = torch.tensor
    assert d_hinge_loss(t([2.0, 3.0]), t([-2.0, -5.0])).item() == 0.0          # both beyond the margin
    assert d_hinge_loss(t([0.0]), t([0.0])).item() == 2.0                      # 1 + 1
    assert d_hinge_loss(t([-1.0]), t([-2.0])).item() == 2.0                    # real side only: 1 - (-1)
    assert d_hinge_loss(t([2.0]), t([0.5])).item() == 1.5                      # fake side only: 1 + 0.5
    assert d_hinge_loss(t([0.5, 2.0]), t([-3.0, 0.0])).item() == pytest.approx(0.25 + 0.5)
    assert g_hinge_loss(t([1.0, 3.0])).item() == -2.0                          # G wants D(fake) large
    assert g_hinge_loss(t([-4.0])).item() == 4.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=8), st.lists(st.floats(-5, 5), min_size=1, max_size=8))
def test_hinge_matches_formula(real, fake):
    r, f = torch.tensor(real, dtype=torch.float64), torch.tensor(fake, dtype=torch.float64)
    want = sum(max(0.0, 1 - v) for v in real) / len(real) + sum(max(0.0, 1 + v) for v in fake) / len(fake)
    assert d_hinge_loss(r, f).item() == pytest.approx(want, abs=1e-9)
    assert g_hinge_loss(f).item() == pytest.approx(-sum(fake) / len(fake), abs=1e-9)


# --- adaptive weight -------------------------------------------------------------------------------

def _linear_case(m: int, n: int, a: float, seed: int):
    """y = W u; L_rec = 0.5||y - t||^2 -> grad = (y - t) u^T; L_adv = a * sum(y) -> grad = a 1 u^T."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64).requires_grad_()
    u, t = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    y = W @ u
    rec, adv = 0.5 * (y - t).square().sum(), a * y.sum()
    r = (W.detach() @ u - t)
    g_rec = r.norm() * u.norm()                                  # ||r u^T||_F = ||r|| ||u||
    g_adv = abs(a) * math.sqrt(m) * u.norm()                     # ||a 1 u^T||_F
    return W, rec, adv, (g_rec / (g_adv + 1e-4)).item()


def test_generator_loss_hand_computation():
    """L_G = L_rec + β·L_dstl + λ·w·L_adv + a·L_anchor with w from ∇_W (L_rec + β·L_dstl), on y = W u (2 x 1)."""
    W = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    y = W @ torch.tensor([1.0], dtype=torch.float64)                  # y = (1, 2)
    rec = 0.5 * (y - torch.tensor([0.0, 1.0], dtype=torch.float64)).square().sum()  # 0.5·(1 + 1) = 1, ∇_W = (1, 1)
    dstl = y.sum()                                                    # 3, ∇_W = (1, 1)
    adv = -2.0 * y[0]                                                 # −2, ∇_W = (−2, 0)
    anchor = torch.tensor(0.25, dtype=torch.float64)
    loss = generator_loss(rec, dstl, adv, anchor, beta=0.5, lam=0.2, last_layer_weight=W)
    # ∇_W (L_rec + β·L_dstl) = (1.5, 1.5): ‖·‖ = 1.5·√2; ‖∇_W L_adv‖ = 2 -> w = 1.5·√2 / (2 + 1e-4)
    w = 1.5 * math.sqrt(2) / (2 + 1e-4)
    assert loss.w.item() == pytest.approx(w, rel=1e-6) and not loss.w.requires_grad  # ∇_W in float32
    assert (loss.rec.item(), loss.dstl.item(), loss.adv.item(), loss.anchor.item()) == (1.0, 3.0, -2.0, 0.25)
    assert loss.reconstruction.item() == 2.5
    assert loss.total.item() == pytest.approx(2.5 + 0.2 * w * -2.0 + 0.25, rel=1e-6)
    # the gradient of the total: ∇(L_rec + β·L_dstl) + λ·w·∇L_adv (w is a constant, the anchor has no W)
    (g,) = torch.autograd.grad(loss.total, W, retain_graph=True)
    assert torch.allclose(g, torch.tensor([[1.5 - 0.4 * w], [1.5]], dtype=torch.float64), rtol=1e-6)
    # the adversarial term off: w = 0 and L_G = L_rec + β·L_dstl; no distillation: L_dstl = 0
    off = generator_loss(rec, dstl, None, beta=0.5, lam=0.2, last_layer_weight=W)
    assert off.w.item() == off.adv.item() == off.adversarial.item() == 0.0 and off.total.item() == 2.5
    assert generator_loss(rec).reconstruction is rec and generator_loss(rec).dstl.item() == 0.0
    # w clipped to w_max
    assert generator_loss(rec, None, 1e-6 * adv, beta=0, lam=1, last_layer_weight=W, w_max=3.0).w.item() == 3.0


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.floats(0.3, 3.0), st.integers(0, 10_000))
def test_adaptive_weight_matches_hand_computation(m, n, a, seed):
    W, rec, adv, want = _linear_case(m, n, a, seed)
    w = adaptive_weight(rec, adv, W)
    assert w.item() == pytest.approx(min(max(want, 0.01), 10.0), rel=1e-6)
    assert not w.requires_grad and w.grad_fn is None
    rec.backward()                                               # retain_graph kept the graph alive


def test_adaptive_weight_clips_both_ends():
    W, rec, adv, want = _linear_case(3, 4, 1e-5, 0)               # tiny adversarial gradient -> huge ratio
    assert want > 10 and adaptive_weight(rec, adv, W).item() == 10.0
    W, rec, adv, want = _linear_case(3, 4, 1e5, 0)                # huge adversarial gradient -> tiny ratio
    assert want < 0.01 and adaptive_weight(rec, adv, W).item() == pytest.approx(0.01)
    W, rec, adv, want = _linear_case(3, 4, 1.0, 0)
    assert adaptive_weight(rec, adv, W, min=0.5, max=0.6).item() == pytest.approx(min(max(want, 0.5), 0.6))


def test_adaptive_weight_missing_or_zero_adv_grad():
    W, rec, _, _ = _linear_case(2, 3, 1.0, 1)
    other = torch.ones(2, requires_grad=True)
    assert adaptive_weight(rec, other.sum(), W).item() == 10.0    # adv does not touch W: grad None
    assert adaptive_weight(rec, 0 * (W.sum()), W).item() == 10.0  # zero grad: ||g_rec|| / eps, clipped
    assert adaptive_weight(rec, torch.tensor(3.0), W).item() == 10.0  # adv with no graph at all
    with pytest.raises(LossConfigError, match="require grad"):
        adaptive_weight(rec, rec, torch.ones(2, 3))


def test_adaptive_weight_reduce_hook_sees_both_gradients():
    """The hook (an all-reduce over ranks in training) gets [∇_W L_rec, ∇_W L_adv] and w uses what it leaves."""
    W, rec, adv, want = _linear_case(3, 2, 0.7, 3)
    seen = []

    def halve_adv(grads):
        seen.append([g.clone() for g in grads])
        grads[1].mul_(0.5)
    w = adaptive_weight(rec, adv, W, reduce=halve_adv)
    (g_rec,) = torch.autograd.grad(rec, W, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adv, W, retain_graph=True)
    assert_close(seen[0][0], g_rec.float())  # the norms are taken in float32, as before the hook
    assert_close(seen[0][1], g_adv.float())
    assert w.item() == pytest.approx(min(max(float(g_rec.norm() / (0.5 * g_adv.norm() + 1e-4)), 0.01), 10.0), rel=1e-5)


# --- distances -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OFFLINE)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("res", [8, 16, 32])
def test_distance_properties(name, channels, res):
    d = make_distance(name)
    a = torch.rand(4, channels, res, res) * 2 - 1
    b = torch.rand(4, channels, res, res) * 2 - 1
    assert torch.equal(d(a, a), torch.zeros(4))
    v = d(a, b)
    assert v.shape == (4,) and (v > 0).all()
    assert_close(v, d(b, a))                        # symmetric
    a.requires_grad_()
    d(a, b).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_distances_at_4px_and_default_is_offline():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for name in OFFLINE:
        assert (make_distance(name)(a, b) > 0).all()
    assert DEFAULT_DISTANCE in OFFLINE and isinstance(make_distance(), nn.Module)
    with pytest.raises(LossConfigError, match="at least 4 px"):
        make_distance("l2")(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2))
    with pytest.raises(LossConfigError, match="equal shape"):
        make_distance("l2")(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 16, 16))
    with pytest.raises(LossConfigError, match="unknown distance"):
        make_distance("ssim")


def test_sum_of_distances():
    a, b = torch.rand(3, 1, 16, 16) * 2 - 1, torch.rand(3, 1, 16, 16) * 2 - 1
    total = make_distance("lite0+multiscale", channels=1, input_size=32)(a, b)
    parts = make_distance("lite0", channels=1, input_size=32)(a, b) + make_distance("multiscale")(a, b)
    assert_close(total, parts)
    assert_close(make_distance("l2+l2+multiscale")(a, b), 2 * make_distance("l2")(a, b) + make_distance("multiscale")(a, b))
    assert_close(make_distance("lite0+0.5*l2", 1, 32)(a, b), make_distance("lite0", 1, 32)(a, b) + 0.5 * make_distance("l2")(a, b))
    with pytest.raises(LossConfigError, match="unknown distance 'ssim'"):
        make_distance("l2+ssim")
    with pytest.raises(LossConfigError, match="unknown distance 'ssim'"):
        make_distance("2*ssim")
    with pytest.raises(LossConfigError, match="bad distance weight in 'x\\*l2'"):
        make_distance("x*l2")


@settings(max_examples=25, deadline=None)
@given(st.floats(-1.0, 1.0), st.sampled_from([4, 8, 16, 32]), st.integers(1, 3))
def test_distances_on_constant_offset(delta, res, channels):
    a = torch.rand(2, channels, res, res, dtype=torch.float64)
    b = a + delta
    dim = channels * res * res
    c = PSEUDO_HUBER_C * math.sqrt(dim)
    assert_close(make_distance("l2")(a, b), torch.full((2,), delta ** 2, dtype=torch.float64))
    want = math.sqrt(dim * delta ** 2 + c * c) - c
    assert_close(pseudo_huber(a, b), torch.full((2,), want, dtype=torch.float64))
    # every pyramid level sees the same RMS error |delta|, so the average is the one-level value
    rms = math.sqrt(delta ** 2 + PSEUDO_HUBER_C ** 2) - PSEUDO_HUBER_C
    ms = make_distance("multiscale")(a, b)
    assert_close(ms, torch.full((2,), rms, dtype=torch.float64))


def test_pyramid_levels():
    assert [lv.shape[-1] for lv in pyramid(torch.zeros(1, 1, 32, 32))] == [32, 16, 8]
    assert [lv.shape[-1] for lv in pyramid(torch.zeros(1, 1, 8, 8))] == [8]
    assert [lv.shape[-1] for lv in pyramid(torch.zeros(1, 1, 4, 4))] == [4]


def test_feature_term_sees_edges_not_flat_offsets():
    d = make_distance("features", channels=1)
    pixel = make_distance("multiscale")
    a = torch.rand(3, 1, 16, 16) * 2 - 1
    # zero-mean filters: a constant brightness offset is left to the pixel term alone
    assert_close(d(a, a + 0.3), pixel(a, a + 0.3), atol=1e-5, rtol=1e-4)
    # blurring removes edges: the feature term adds a clearly positive amount
    blur = F.avg_pool2d(F.pad(a, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert ((d(a, blur) - pixel(a, blur)) > 0.05).all()
    # fixed seed: a second instance gives identical values; another seed does not
    assert_close(make_distance("features", channels=1)(a, blur), d(a, blur))
    assert not torch.allclose(RandomFeatureDistance(in_channels=1, seed=1)(a, blur), d(a, blur))
    with pytest.raises(LossConfigError, match="channels=2"):
        d(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))


def test_lpips_without_weights_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))   # an empty hub cache
    with pytest.raises(LossConfigError) as e:
        make_distance("lpips")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("LPIPS needs pretrained weights that cannot be downloaded here")
    assert "pip install lpips" in msg and "--distance multiscale" in msg


# --- DiffAugment -----------------------------------------------------------------------------------

def test_diff_augment_shapes_grad_and_determinism():
    x = (torch.rand(8, 3, 16, 16) * 2 - 1).requires_grad_()
    y = diff_augment(x, generator=torch.Generator().manual_seed(3))
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    same = diff_augment(x, generator=torch.Generator().manual_seed(3))
    other = diff_augment(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(y, same) and not torch.equal(y, other)
    assert diff_augment(torch.zeros(2, 1, 8, 8)).shape == (2, 1, 8, 8)          # grey images work
    with pytest.raises(LossConfigError, match="unknown DiffAugment op"):
        diff_augment(x, "color,rotate")


def test_translation_is_a_per_sample_zero_padded_shift():
    x = torch.rand(16, 1, 16, 16) + 1                            # strictly positive: padding shows as 0
    y = diff_augment(x, "translation", torch.Generator().manual_seed(0))
    shifts = []
    for xi, yi in zip(x, y):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(yi, _shift(xi, dy, dx))]
        assert found, "output is not a shift of its input within 1/8 of the size"
        shifts.append(found[0])
    assert len(set(shifts)) > 1 and any(s != (0, 0) for s in shifts)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = x[i + dy, j + dx], zero outside."""
    H, W = x.shape[-2:]
    p = F.pad(x, (2, 2, 2, 2))
    return p[..., 2 + dy:2 + dy + H, 2 + dx:2 + dx + W]


def test_cutout_zeroes_one_square_per_sample():
    x = torch.rand(16, 3, 20, 20) + 1
    y = diff_augment(x, "cutout", torch.Generator().manual_seed(0))
    zeros = (y == 0).all(dim=1)                                   # (B, H, W) cut pixels
    side = int(20 * 0.2 + 0.5)
    counts = zeros.flatten(1).sum(1)
    assert (counts > 0).all() and (counts <= side * side).all()
    assert torch.equal(y[~zeros.unsqueeze(1).expand_as(y)], x[~zeros.unsqueeze(1).expand_as(x)])
    assert len({tuple(z.nonzero()[0].tolist()) for z in zeros}) > 1  # independent draws per sample


def test_color_draws_differ_per_sample():
    x = torch.rand(1, 3, 8, 8).expand(6, -1, -1, -1) * 2 - 1
    y = diff_augment(x, "color", torch.Generator().manual_seed(0))
    assert len({round(v, 5) for v in y.mean(dim=(1, 2, 3)).tolist()}) == 6


# --- teacher-sample cache --------------------------------------------------------------------------

class _CountingTeacher:
    def __init__(self):
        self.calls, self.seen = 0, 0

    def __call__(self, z, labels, omega=None):
        self.calls += 1
        self.seen += z.shape[0]
        x = torch.tanh(z / 80.0) + (0 if labels is None else labels.view(-1, 1, 1, 1).float())
        return x if omega is None else x * omega.view(-1, 1, 1, 1)


def test_teacher_cache_computes_each_z_once_and_reloads(tmp_path):
    path = tmp_path / "teacher.pt"
    teacher = _CountingTeacher()
    cache = TeacherSampleCache(teacher, pool_size=10, shape=(1, 4, 4), num_classes=3, sigma_max=80.0, seed=7, path=path)
    z, y, w, x0 = cache.get(torch.tensor([0, 1, 2, 1]))
    assert w is None  # no guidance: ω is not drawn
    assert (teacher.calls, teacher.seen) == (1, 3)               # duplicates computed once
    assert_close(x0, teacher(z, y))
    teacher.calls = teacher.seen = 0
    cache.get(torch.tensor([2, 3]))
    assert (teacher.calls, teacher.seen) == (1, 1)               # only the new index
    cache.get(torch.tensor([0, 3]))
    assert teacher.calls == 1                                    # nothing new
    assert 40 < cache.z.std().item() < 120                       # z ~ N(0, sigma_max^2)

    def refuse(z, labels, omega):
        raise AssertionError("sample_fn called for a cached z")

    again = TeacherSampleCache(refuse, pool_size=10, shape=(1, 4, 4), num_classes=3, sigma_max=80.0, seed=7, path=path)
    z2, y2, _, x2 = again.get(torch.tensor([0, 1, 2, 3]))
    z1, y1, _, x1 = cache.get(torch.tensor([0, 1, 2, 3]))
    assert torch.equal(z1, z2) and torch.equal(y1, y2) and torch.equal(x1, x2)
    with pytest.raises(LossConfigError, match="delete it"):
        TeacherSampleCache(refuse, pool_size=10, shape=(1, 4, 4), num_classes=3, sigma_max=80.0, seed=8, path=path)
    with pytest.raises(LossConfigError, match="indices"):
        cache.get(torch.tensor([10]))


def test_teacher_cache_in_memory_unconditional():
    teacher = _CountingTeacher()
    cache = TeacherSampleCache(teacher, pool_size=4, shape=(3, 2, 2), num_classes=None, sigma_max=80.0)
    z, y, _, x0 = cache.get([3, 0])
    assert y is None and z.shape == (2, 3, 2, 2) and teacher.calls == 1
    assert_close(x0, torch.tanh(z / 80.0))
    assert torch.equal(TeacherSampleCache(teacher, 4, (3, 2, 2), None, 80.0).z, cache.z)   # pool fixed by the seed


def test_teacher_cache_draws_a_fixed_guidance_scale_per_entry(tmp_path):
    teacher = _CountingTeacher()
    cache = TeacherSampleCache(teacher, pool_size=64, shape=(1, 2, 2), num_classes=3, sigma_max=80.0, seed=3,
                               path=tmp_path / "t.pt", guidance_max=4.0)
    z, y, w, x0 = cache.get(torch.arange(64))
    assert w.shape == (64,) and 1 <= w.min() and w.max() <= 4 and w.std() > 0.5  # ω ~ U[1, ω_max] per entry
    assert_close(x0, teacher(z, y, w))  # the teacher sample is the guided one, at that entry's ω
    again = TeacherSampleCache(teacher, 64, (1, 2, 2), 3, 80.0, seed=3, path=tmp_path / "t.pt", guidance_max=4.0)
    assert torch.equal(again.get(torch.arange(64))[2], w)
