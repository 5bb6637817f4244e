import math

import pytest

torch = pytest.importorskip("torch")

from training.methods.losses import fusc_loss, nt_xent  # noqa: E402


def test_nt_xent_matches_hand_computation():
    # Two pairs in 2-D: z1 = [e1, e2], z2 = [e1, e2]; temperature 1.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # For view 0 (e1): candidates are view1 (e2, sim 0), view2 (e1, sim 1, positive), view3 (e2, sim 0).
    expected = -math.log(math.e / (math.e + 2.0))
    assert nt_xent(z1, z2, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_fusc_loss_matches_hand_computation():
    # Anchor probs p = [0.5, 0.5] and [1, 0]-ish; neighbours identical.
    a = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    n = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    total, cons, ent = fusc_loss(a, n, entropy_weight=5.0)
    p1 = torch.softmax(a[1], 0)
    want_cons = -(math.log(0.5) + math.log(float((p1 * p1).sum()))) / 2
    mean_p = (torch.tensor([0.5, 0.5]) + p1) / 2
    want_ent = float(-(mean_p * mean_p.log()).sum())
    assert cons.item() == pytest.approx(want_cons, rel=1e-5)
    assert ent.item() == pytest.approx(want_ent, rel=1e-5)
    assert total.item() == pytest.approx(want_cons - 5.0 * want_ent, rel=1e-5)


def test_fusc_loss_falls_and_clusters_neighbours_together():
    torch.manual_seed(0)
    # Two well separated groups of embeddings; each anchor's neighbour is from its own group.
    x = torch.cat([torch.randn(32, 8) + 4, torch.randn(32, 8) - 4])
    nbr = torch.cat([torch.randint(0, 32, (32,)), torch.randint(32, 64, (32,))])
    head = torch.nn.Linear(8, 2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        loss = fusc_loss(head(x), head(x[nbr]), 5.0)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # The optimum is consistency 0 and a uniform cluster marginal: -5 * ln 2.
    assert losses[-1] < losses[0]
    assert losses[-1] == pytest.approx(-5 * math.log(2), abs=1e-2)
    pred = head(x).argmax(1)
    assert (pred[:32] == pred[0]).all() and (pred[32:] == pred[32]).all() and pred[0] != pred[32]


def test_nt_xent_falls_over_steps():
    torch.manual_seed(0)
    x = torch.randn(16, 10)
    proj = torch.nn.Linear(10, 4)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        noisy1, noisy2 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
        loss = nt_xent(proj(noisy1), proj(noisy2), 0.5)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.2


def test_barlow_twins_matches_hand_computation():
    from training.methods.losses import barlow_twins_loss

    # Two samples, two dims: standardised columns are +-1, so C = z1^T z2 / 2.
    z1 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    z2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    # C = [[1, -1], [1, -1]]: on-diagonal (1-1)^2 + (-1-1)^2 = 4; off-diagonal (-1)^2 + 1^2 = 2.
    assert barlow_twins_loss(z1, z2, redundancy_weight=0.5).item() == pytest.approx(4 + 0.5 * 2, rel=1e-4)


def test_barlow_twins_falls_over_steps():
    from training.methods.losses import barlow_twins_loss

    torch.manual_seed(0)
    x = torch.randn(64, 12)
    proj = torch.nn.Linear(12, 8)
    with torch.no_grad():  # start fully redundant: every output is nearly the same feature
        proj.weight.copy_(0.3 + 0.01 * torch.randn(8, 12))
    opt = torch.optim.SGD(proj.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        loss = barlow_twins_loss(
            proj(x + 0.1 * torch.randn_like(x)), proj(x + 0.1 * torch.randn_like(x)), 0.05
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
