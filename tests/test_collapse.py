"""The collapse monitor and the DINO machinery on data whose answer is known."""

import math

import numpy as np
import pytest
import torch

from hierdino.losses.collapse import (
    CollapseWatch,
    TrainingCollapsedError,
    distinct_argmax,
    entropy_ratio,
    feature_spread,
)
from hierdino.losses.dino import TeacherCentering, dino_loss
from hierdino.models.heads import DINOHead


def test_entropy_ratio_and_distinct_argmax_by_hand():
    uniform = torch.full((4, 8), 1 / 8)
    one_hot = torch.eye(8)[[3, 3, 3, 3]]
    assert entropy_ratio(uniform) == pytest.approx(1.0)
    assert entropy_ratio(one_hot) == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0, 0]])  # ln 2 / ln 8 = 1/3
    assert entropy_ratio(half) == pytest.approx(1 / 3, rel=1e-6)
    assert distinct_argmax(one_hot) == 1
    assert distinct_argmax(torch.eye(8)) == 8
    assert math.isnan(entropy_ratio(torch.zeros(0, 8))) and distinct_argmax(torch.zeros(0, 8)) == 0


def test_feature_spread_is_one_on_random_and_zero_on_identical_features():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(4096, 64, generator=g) * 5 + 0.0
    assert feature_spread(random) == pytest.approx(1.0, abs=0.03)
    identical = torch.randn(1, 64, generator=g).repeat(256, 1)
    assert feature_spread(identical) == pytest.approx(0.0, abs=1e-5)
    # a shared offset much larger than the per-image part: nearly collapsed
    assert feature_spread(identical * 100 + torch.randn(256, 64, generator=g)) < 0.05


def test_collapse_watch_warns_once_after_warmup_and_can_stop():
    w = CollapseWatch(warmup_steps=20, threshold=0.98, patience=3)
    assert w.observe(10, 0.999) is None and w.observe(20, 0.999) is None  # warm-up
    assert w.observe(30, 0.99) is None and w.observe(40, 0.5) is None      # streak broken
    assert w.observe(50, 0.99) is None and w.observe(60, 0.99) is None
    msg = w.observe(70, 0.995)
    assert msg and "step 70" in msg and "0.995" in msg
    assert w.observe(80, 0.999) is None  # a single warning
    stopper = CollapseWatch(warmup_steps=0, patience=2, stop=True)
    stopper.observe(10, 0.99)
    with pytest.raises(TrainingCollapsedError, match="step 20"):
        stopper.observe(20, 0.99)


def _homogeneity(clusters: np.ndarray, assigned: np.ndarray) -> float:
    """1 - H(cluster | prototype) / H(cluster), written out (the V-measure's homogeneity)."""
    n = len(clusters)
    h_c = -sum((c / n) * math.log(c / n) for c in np.bincount(clusters) if c)
    h_c_given_k = 0.0
    for k in np.unique(assigned):
        members = clusters[assigned == k]
        for c in np.bincount(members):
            if c:
                h_c_given_k -= (c / n) * math.log(c / len(members))
    return 1.0 - h_c_given_k / h_c


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_dino_head_and_ema_teacher_learn_known_clusters(centering):
    """Fixed inputs from 10 separated clusters (no backbone): student head + EMA teacher + centering must
    push the DINO loss well below ln K and give each cluster its own teacher prototypes."""
    g = torch.Generator().manual_seed(0)
    dim, k, n_clusters, batch = 32, 64, 10, 64
    centres = torch.randn(n_clusters, dim, generator=g) * 3
    torch.manual_seed(0)
    student = DINOHead(dim, k, hidden=64, bottleneck=16, layers=2)
    teacher = DINOHead(dim, k, hidden=64, bottleneck=16, layers=2)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    center = TeacherCentering(k, centering)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    ln_k = math.log(k)
    for step in range(300):
        c = torch.randint(0, n_clusters, (batch,), generator=g)
        views = [centres[c] + 0.3 * torch.randn(batch, dim, generator=g) for _ in range(2)]
        with torch.no_grad():
            t_logits = teacher(torch.cat(views))
            targets = center.targets(t_logits, 0.04).chunk(2)
        loss = dino_loss(list(student(torch.cat(views)).chunk(2)), list(targets), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        center.update(t_logits)
        with torch.no_grad():
            for tp, sp in zip(teacher.parameters(), student.parameters()):
                tp.mul_(0.99).add_(sp, alpha=0.01)
    assert loss.item() < 0.5 * ln_k
    c = torch.arange(n_clusters).repeat_interleave(20)
    with torch.no_grad():
        assigned = center.targets(teacher(centres[c] + 0.3 * torch.randn(len(c), dim, generator=g)), 0.04).argmax(-1)
    assert _homogeneity(c.numpy(), assigned.numpy()) > 0.9
    assert len(torch.unique(assigned)) >= n_clusters // 2  # not one prototype for everything
