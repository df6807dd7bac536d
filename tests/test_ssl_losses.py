import math

import numpy as np
import pytest
import torch

from hierdino.losses.dino import TeacherCentering, cross_entropy_soft, dino_loss, sinkhorn_knopp
from hierdino.losses.ibot import ibot_patch_loss
from hierdino.losses.koleo import koleo_loss
from hierdino.train.schedules import Schedules, cosine, scaled_lr


def test_sinkhorn_knopp_marginals():
    torch.manual_seed(0)
    logits = torch.randn(64, 16) * 3
    q = sinkhorn_knopp(logits, teacher_temp=0.5, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # each sample a distribution
    assert torch.allclose(q.sum(0), torch.full((16,), 64 / 16), rtol=1e-3)  # uniform prototype usage
    q3 = sinkhorn_knopp(logits, 0.5, iterations=3)
    assert torch.allclose(q3.sum(1), torch.ones(64), atol=1e-5)
    assert (q3.sum(0).std() < torch.softmax(logits / 0.5, 1).sum(0).std())  # closer to uniform than softmax
    extreme = sinkhorn_knopp(logits * 1000, 0.04)
    assert torch.isfinite(extreme).all() and torch.allclose(extreme.sum(1), torch.ones(64), atol=1e-4)


def test_sinkhorn_knopp_equals_alternate_normalisation_of_the_full_matrix():
    """Against the textbook form in float64 NumPy: Q = exp(logits / T), then per round prototypes
    (columns of [B, K]) scaled to mass 1/K and samples (rows) to 1/B, finally rows to sum 1."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 0.5, (40, 24))  # exp((l - max) / T) stays above the 1e-30 floor
    for temp, rounds in ((0.07, 3), (0.5, 1), (0.2, 10)):
        q = np.exp((logits - logits.max()) / temp)
        q /= q.sum()
        for _ in range(rounds):
            q /= q.sum(0, keepdims=True) * q.shape[1]
            q /= q.sum(1, keepdims=True) * q.shape[0]
        expected = q * q.shape[0]
        got = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), temp, iterations=rounds).double().numpy()
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-7), (temp, rounds, np.abs(got - expected).max())


def test_ema_centering_math():
    c = TeacherCentering(4, "ema", momentum=0.9)
    t = torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0]])
    probs = c.targets(t, 0.5)
    assert torch.allclose(probs, torch.softmax(t / 0.5, 1))
    c.update(t)
    assert torch.allclose(c.center, 0.1 * t.mean(0, keepdim=True))
    c.update(t)
    assert torch.allclose(c.center, (0.9 * 0.1 + 0.1) * t.mean(0, keepdim=True))
    assert torch.allclose(c.targets(t, 0.5), torch.softmax((t - c.center) / 0.5, 1))
    kept = c.center.clone()
    c.update(torch.full_like(t, float("nan")))  # the logits of a step that will be skipped
    assert torch.equal(c.center, kept)
    with pytest.raises(ValueError, match="'median'"):
        TeacherCentering(4, "median")


def test_dino_loss_of_identical_outputs_is_target_entropy():
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    tau = 0.1
    targets = torch.softmax(logits / tau, -1)
    entropy = -(targets * targets.log()).sum(-1).mean()
    loss = dino_loss([logits, logits], [targets, targets], tau)
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    # a different student costs more (Gibbs' inequality)
    assert dino_loss([logits, torch.randn(8, 10)], [targets, targets], tau) > loss


def test_dino_loss_pairs_with_local_crops():
    torch.manual_seed(1)
    s = [torch.randn(4, 6) for _ in range(4)]  # 2 global + 2 local
    t = [torch.softmax(torch.randn(4, 6), -1) for _ in range(2)]
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    expected = sum(cross_entropy_soft(s[j], t[i], 0.1).mean() for i, j in pairs) / len(pairs)
    assert dino_loss(s, t, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ibot_loss_against_loop():
    """DINOv2's normalisation: per-crop means over masked patches, summed, divided by ALL crops (3 here, 1 unmasked)."""
    torch.manual_seed(2)
    masks = torch.zeros(3, 5, dtype=torch.bool)
    masks[0, [1, 2]] = True
    masks[2, [0, 1, 3, 4]] = True
    m = int(masks.sum())
    s, t = torch.randn(m, 7), torch.softmax(torch.randn(m, 7), -1)
    ref, k = [], 0
    for b in range(3):
        n = int(masks[b].sum())
        if n:
            ref.append(sum(-(t[k + i] * torch.log_softmax(s[k + i] / 0.1, -1)).sum() for i in range(n)) / n)
            k += n
    assert len(ref) == 2
    assert ibot_patch_loss(s, t, masks, 0.1).item() == pytest.approx((sum(ref) / 3).item(), rel=1e-5)
    none = torch.zeros(3, 5, dtype=torch.bool)  # no masked patch anywhere: zero with a live graph
    empty = torch.zeros(0, 7, requires_grad=True)
    out = ibot_patch_loss(empty, torch.zeros(0, 7), none, 0.1)
    assert out.item() == 0.0 and out.requires_grad


def test_padded_ibot_loss_is_the_loss_over_the_masked_patches_alone():
    """A fixed-size buffer: the real rows, then padding rows (any finite values) weighed 0. The loss is
    the hand loop over the truly masked patches: per-crop means, summed, over all 3 crops."""
    torch.manual_seed(3)
    masks = torch.zeros(3, 5, dtype=torch.bool)
    masks[0, [1, 2]] = True
    masks[2, [0, 1, 3, 4]] = True
    m, pad = int(masks.sum()), 4
    s, t = torch.randn(m + pad, 7), torch.softmax(torch.randn(m + pad, 7), -1)
    crop = torch.cat([masks.nonzero()[:, 0], torch.zeros(pad, dtype=torch.long)])  # padding points at crop 0
    weight = torch.cat([torch.ones(m), torch.zeros(pad)])
    ref = (sum(-(t[i] * torch.log_softmax(s[i] / 0.1, -1)).sum() for i in range(2)) / 2
           + sum(-(t[i] * torch.log_softmax(s[i] / 0.1, -1)).sum() for i in range(2, 6)) / 4) / 3
    assert ibot_patch_loss(s, t, masks, 0.1, crop, weight).item() == pytest.approx(ref.item(), rel=1e-6)
    none = torch.zeros(3, 5, dtype=torch.bool)  # nothing masked, a buffer of padding: zero with a live graph
    out = ibot_patch_loss(s.requires_grad_(), t, none, 0.1, crop, torch.zeros(m + pad))
    assert out.item() == 0.0 and out.requires_grad


def test_padding_rows_change_neither_sinkhorn_targets_nor_the_centre():
    """``valid``: the real rows' Sinkhorn-Knopp targets are those of the real rows alone (padding rows
    get zeros), and the EMA centre moves by the real rows' mean alone."""
    torch.manual_seed(4)
    real, pad = torch.randn(6, 16) * 3, torch.randn(3, 16) * 50
    logits, valid = torch.cat([real, pad]), torch.tensor([True] * 6 + [False] * 3)
    got = sinkhorn_knopp(logits, 0.07, valid=valid)
    assert torch.allclose(got[:6], sinkhorn_knopp(real, 0.07), rtol=1e-5, atol=1e-7)
    assert (got[6:] == 0).all()
    nothing = sinkhorn_knopp(logits, 0.07, valid=torch.zeros(9, dtype=torch.bool))  # no real row: zeros, not NaN
    assert (nothing == 0).all()
    a, b = TeacherCentering(16, "ema", 0.5), TeacherCentering(16, "ema", 0.5)
    a.update(logits, valid)
    b.update(real)
    assert torch.allclose(a.center, 0.5 * real.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.center, b.center, rtol=1e-6, atol=1e-7)


def test_ibot_loss_hand_computed():
    """Two crops, one masked with patches whose CE are hand-computable: (ln 2 + ln 2) / 2 / 2 crops."""
    masks = torch.tensor([[True, True, False], [False, False, False]])
    s = torch.zeros(2, 2)                         # student uniform over 2 prototypes: CE = ln 2 for any target
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert ibot_patch_loss(s, t, masks, 0.1).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_koleo_on_known_points():
    square = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    # each point's nearest neighbour is at distance sqrt(2)
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    clustered = torch.tensor([[1.0, 0], [1.0, 0.01], [-1, 0], [-1, 0.01]])
    assert koleo_loss(clustered) > koleo_loss(square)


def test_dino_loss_hand_computed():
    """Two global crops, K = 2: pairs (teacher 0, student 1) and (teacher 1, student 0), averaged."""
    s0, s1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.1, 0.0]])  # / tau=0.1 -> logits [0, 0] and [1, 0]
    t0, t1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    ce_t0_s1 = -math.log(math.e / (math.e + 1))    # target prototype 0 under softmax([1, 0])
    ce_t1_s0 = math.log(2)                          # any target under softmax([0, 0])
    assert dino_loss([s0, s1], [t0, t1], 0.1).item() == pytest.approx((ce_t0_s1 + ce_t1_s0) / 2, rel=1e-6)


def test_koleo_is_summed_over_global_crops_in_the_step():
    """DINOv2 adds KoLeo of each global crop (no mean): the step's term is L(crop 1) + L(crop 2)."""
    from hierdino.config import load_config
    from hierdino.hierarchy import load_hierarchy
    from hierdino.models.student_teacher import StepBatch, StudentTeacher

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "data.image_size=32", "loss.koleo_weight=0.1",
                                   "data.local_crops_number=0", "loss.supervised.kind=none"])
    torch.manual_seed(0)
    model = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    crops = torch.randn(8, 3, 32, 32)
    batch = StepBatch(crops, None, torch.zeros(8, 16, dtype=torch.bool), torch.full((4,), -1), None, None)
    _, terms, _ = model.losses(batch, 0.04)
    cls, _ = model.student["backbone"](crops)
    expected = koleo_loss(cls[:4]) + koleo_loss(cls[4:])
    assert terms["koleo"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_sinkhorn_of_identical_teacher_outputs_is_uniform():
    q = sinkhorn_knopp(torch.randn(1, 32).repeat(16, 1), teacher_temp=0.04)
    assert torch.allclose(q, torch.full((16, 32), 1 / 32), atol=1e-6)


def test_schedules():
    assert cosine(0, 1.0, 0.1, 100, warmup_steps=10) == 0.0
    assert cosine(5, 1.0, 0.1, 100, warmup_steps=10) == pytest.approx(0.5)
    assert cosine(10, 1.0, 0.1, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine(100, 1.0, 0.1, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine(55, 1.0, 0.0, 100, warmup_steps=10) == pytest.approx(0.5)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    from hierdino.config import load_config

    s = Schedules.from_config(load_config("tiny-cpu", ["loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
                                                         "loss.warmup_teacher_temp_steps=100"]))
    assert s.at(0)["teacher_temp"] == pytest.approx(0.04) and s.at(50)["teacher_temp"] == pytest.approx(0.055)
    assert s.at(100)["teacher_temp"] == pytest.approx(0.07)
    assert s.at(s.total)["momentum"] == pytest.approx(1.0) and s.at(0)["freeze_last_layer"]
    assert not s.at(s.freeze_last_layer_steps)["freeze_last_layer"]


def test_sinkhorn_and_centering_accept_an_empty_batch():
    assert sinkhorn_knopp(torch.zeros(0, 8), 0.07).shape == (0, 8)
    c = TeacherCentering(8, "ema")
    c.update(torch.zeros(0, 8))
    assert torch.isfinite(c.center).all()


def _numpy_ce(target: np.ndarray, student: np.ndarray, tau: float) -> float:
    """mean_b sum_k -target[b, k] * log_softmax(student[b] / tau)[k], in float64 numpy (not our loss code)."""
    z = student.astype(np.float64) / tau
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-(target.astype(np.float64) * log_p).sum(axis=1).mean())


def _numpy_pair_ces(targets, students, tau) -> list[float]:
    """One cross-entropy per pair (teacher global crop i, student crop j), j != i."""
    return [_numpy_ce(t, s, tau) for i, t in enumerate(targets) for j, s in enumerate(students) if i != j]


# Fixed tensors: 2 images, 3 prototypes; crops 0-1 global, 2-3 local.
_STUDENT = [np.array([[0.2, -0.1, 0.0], [0.05, 0.3, -0.2]]), np.array([[-0.3, 0.1, 0.2], [0.0, 0.0, 0.1]]),
            np.array([[0.1, 0.1, -0.4], [0.25, -0.05, 0.0]]), np.array([[0.0, -0.2, 0.3], [-0.1, 0.2, 0.15]])]
_TEACHER = [np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]), np.array([[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])]


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_scale_is_the_mean_over_pairs(n_local):
    """The chosen scale (README "Loss scales"): the mean over the 2 (n_crops - 1) pairs. Without local
    crops that is 1.5x DINOv2's sum / (2 + max(2 n_local, 1)) = sum / 3; with local crops the two agree."""
    students, tau = _STUDENT[:2 + n_local], 0.1
    ces = _numpy_pair_ces(_TEACHER, students, tau)
    assert len(ces) == 2 + 2 * n_local
    mean = sum(ces) / len(ces)
    dinov2 = sum(ces) / (2 + max(2 * n_local, 1))
    ours = dino_loss([torch.tensor(s, dtype=torch.float32) for s in students],
                     [torch.tensor(t, dtype=torch.float32) for t in _TEACHER], tau).item()
    assert ours == pytest.approx(mean, rel=1e-6)
    if n_local == 0:
        assert ours == pytest.approx(1.5 * dinov2, rel=1e-6) and ours != pytest.approx(dinov2, rel=1e-3)
    else:
        assert ours == pytest.approx(dinov2, rel=1e-6)


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_scale_in_the_step(n_local):
    """The step's DINO term and its share of the total, against numpy cross-entropies of the very
    logits and targets the step computed: the mean over pairs, times ``loss.dino_weight``."""
    from hierdino.config import load_config
    from hierdino.hierarchy import load_hierarchy
    from hierdino.models.student_teacher import StepBatch, StudentTeacher

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "data.image_size=32", "loss.supervised.kind=none",
                                   f"data.local_crops_number={n_local}", "data.local_crops_size=16",
                                   "loss.dino_local=true", "loss.ibot_weight=0", "loss.koleo_weight=0"])
    torch.manual_seed(0)
    model = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    seen = {}

    def recording_dino_loss(student_logits, teacher_targets, student_temp):
        seen.update(students=[s.detach().numpy() for s in student_logits],
                    targets=[t.detach().numpy() for t in teacher_targets], tau=student_temp)
        return dino_loss(student_logits, teacher_targets, student_temp)

    model.dino_loss = recording_dino_loss
    local = torch.randn(n_local * 4, 3, 16, 16) if n_local else None
    batch = StepBatch(torch.randn(8, 3, 32, 32), local, torch.zeros(8, 16, dtype=torch.bool), torch.full((4,), -1),
                      None, None)
    total, terms, _ = model.losses(batch, 0.04)
    assert len(seen["targets"]) == 2 and len(seen["students"]) == 2 + n_local
    ces = _numpy_pair_ces(seen["targets"], seen["students"], seen["tau"])
    assert terms["dino"].item() == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    assert total.item() == pytest.approx(cfg.loss.dino_weight * sum(ces) / len(ces), rel=1e-5)
