"""Weighted k-NN (esvit.evaluation.knn) against hand-computed votes and an explicit-loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from esvit.evaluation.knn import knn_classify, knn_vote


def _toy():
    # Query [1, 0]; cosine similarities to the training points are 1.0, 0.8, 0.6 and -1.0.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    train_labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[1.0, 0.0]])
    return train, train_labels, test


def test_votes_by_hand():
    sims = torch.tensor([[1.0, 0.8, 0.6]])
    labels = torch.tensor([[0, 1, 1]])
    votes = knn_vote(sims, labels, num_classes=3, temperature=0.5)
    expected = torch.tensor([[math.exp(2.0), math.exp(1.6) + math.exp(1.2), 0.0]])
    torch.testing.assert_close(votes, expected)


def test_temperature_decides_between_one_close_and_two_far_neighbours():
    train, train_labels, test = _toy()
    # k=3 neighbours: class 0 at s=1.0, class 1 at s=0.8 and 0.6.
    # T=0.07: exp(1/0.07) = 1.6e6 beats exp(0.8/0.07) + exp(0.6/0.07) = 9.4e4 -> class 0.
    # T=10:   exp(0.1) = 1.105 loses to exp(0.08) + exp(0.06) = 2.145 -> class 1.
    sharp = knn_classify(train, train_labels, test, torch.tensor([0]), num_classes=2, ks=(1, 3), temperature=0.07)
    flat = knn_classify(train, train_labels, test, torch.tensor([0]), num_classes=2, ks=(1, 3), temperature=10.0)
    assert sharp == {1: {"top1": 100.0}, 3: {"top1": 100.0}}  # no top5 with 2 classes
    assert flat == {1: {"top1": 100.0}, 3: {"top1": 0.0}}
    # Features are L2-normalised first: rescaling the rows changes nothing.
    scaled = knn_classify(
        train * torch.tensor([[5.0], [0.1], [3.0], [7.0]]),
        train_labels,
        9 * test,
        torch.tensor([0]),
        num_classes=2,
        ks=(1, 3),
        temperature=10.0,
    )
    assert scaled == flat


def _explicit_knn(train, train_labels, test, test_labels, num_classes, k, temperature):
    """Plain-Python weighted k-NN: cosine similarity, top-k, exp(s/T) votes, rank classes."""
    top1 = top5 = 0
    for q, target in zip(test.tolist(), test_labels.tolist()):
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for x, label in zip(train.tolist(), train_labels.tolist()):
            xn = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(q, x)) / (qn * xn), label))
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * num_classes
        for s, label in sims[:k]:
            votes[label] += math.exp(s / temperature)
        ranking = sorted((c for c in range(num_classes) if votes[c] > 0), key=lambda c: -votes[c])
        top1 += ranking[0] == target
        top5 += target in ranking[:5]
    n = len(test_labels)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def test_matches_explicit_loops_with_ragged_chunks():
    g = torch.Generator().manual_seed(0)
    num_classes = 7
    train = torch.randn(40, 6, generator=g, dtype=torch.float64).float()
    train_labels = torch.randint(0, num_classes, (40,), generator=g)
    # Test points near training points so that k-NN is well above chance.
    pick = torch.randint(0, 40, (17,), generator=g)
    test = train[pick] + 0.3 * torch.randn(17, 6, generator=g)
    test_labels = train_labels[pick].clone()
    test_labels[:3] = (test_labels[:3] + 1) % num_classes  # a few wrong labels
    ks = (1, 3, 10, 40)
    got = knn_classify(train, train_labels, test, test_labels, num_classes, ks=ks, temperature=0.3, batch_size=4)
    for k in ks:
        expected = _explicit_knn(train, train_labels, test, test_labels, num_classes, k, 0.3)
        assert got[k] == pytest.approx(expected), k
    # The chunk size only bounds memory.
    assert (
        knn_classify(train, train_labels, test, test_labels, num_classes, ks=ks, temperature=0.3, batch_size=1000)
        == got
    )
    assert 0.0 < got[1]["top1"] < 100.0  # the reference exercises both outcomes


def test_rejects_bad_input():
    train, train_labels, test = _toy()
    with pytest.raises(ValueError, match="every k"):
        knn_classify(train, train_labels, test, torch.tensor([0]), num_classes=2, ks=(5,))
    with pytest.raises(ValueError, match="dim"):
        knn_classify(train, train_labels, torch.zeros(1, 3), torch.tensor([0]), num_classes=2, ks=(1,))
    with pytest.raises(ValueError, match="train labels"):
        knn_classify(train, train_labels, test, torch.tensor([0]), num_classes=1, ks=(1,))


def test_leave_one_out_votes_each_image_among_all_the_others():
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(30, 6, generator=generator), torch.randint(0, 5, (30,), generator=generator)
    result = knn_classify(features, labels, features, labels, 5, ks=(1, 4), leave_one_out=True, batch_size=7)
    for k in (1, 4):  # each image scored against the other 29 alone
        hits = 0
        for i in range(30):
            others = torch.cat([torch.arange(i), torch.arange(i + 1, 30)])
            single = knn_classify(features[others], labels[others], features[i : i + 1], labels[i : i + 1], 5, ks=(k,))
            hits += single[k]["top1"] == 100.0
        assert result[k]["top1"] == pytest.approx(100.0 * hits / 30)
    # without leaving out, every image is its own nearest neighbour
    assert knn_classify(features, labels, features, labels, 5, ks=(1,))[1]["top1"] == 100.0
    with pytest.raises(ValueError, match="leave_one_out needs"):
        knn_classify(features, labels, features[:10], labels[:10], 5, ks=(1,), leave_one_out=True)
    with pytest.raises(ValueError, match=r"every k must lie in \[1, 29\]"):
        knn_classify(features, labels, features, labels, 5, ks=(30,), leave_one_out=True)
