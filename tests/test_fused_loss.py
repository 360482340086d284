"""The loss and head fusions equal the plain formulas they replace (float32, CPU, fresh random inputs).

* `EsViTLoss` runs one cross-entropy per student view with the (matched) targets of all its teacher
  views summed; the plain formula runs one per (teacher view, student view) pair, with a full-size
  gather of the matched teacher rows (`plain_loss` below, written out independently).
* `WeightNormLinear` builds its weight with the fused `torch._weight_norm`; the plain formula is
  `g * v / ||v||` as separate ops.

"Equal" is 1e-6 relative: for a scalar its relative difference, for a tensor the largest absolute
difference over the tensor's largest magnitude. Every test draws new inputs (the seed is in the
failure message), so repeated runs keep probing other values.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from esvit.heads import DINOHead, WeightNormLinear
from esvit.training.loss import EsViTLoss, matched_region_cross_entropy, summed_cross_entropy
from esvit.training.targets import TEACHER_TARGETS
from tests.test_loss import random_outputs

RTOL = 1e-6


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, what: str, seed: int) -> None:
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    err = ((got - want).abs().max() / scale).item()
    assert err <= RTOL, f"{what}: relative difference {err:.2e} > {RTOL} (seed {seed})"


def plain_targets(name, logits, center, temp):
    """Teacher probabilities and mean entropy, the entropy from a separate log-softmax pass."""
    if name == "centering":
        scaled = (logits - center) / temp
        probs = F.softmax(scaled, dim=-1)
        return probs, -(probs * F.log_softmax(scaled, dim=-1)).sum() / logits.shape[0]
    probs, entropy = TEACHER_TARGETS[name](logits, center, temp, logits.shape[0])
    return probs, entropy / logits.shape[0]


def plain_loss(student, teacher, temp, view_center, region_center, num_global=2, targets="centering"):
    """Per (teacher view i, student view v != i) pair: a cross-entropy with its own log-softmax and
    a full-size gather of the matched teacher rows; mean over pairs of 0.5 view + 0.5 region."""
    batch = teacher.view_logits.shape[0] // num_global
    n_crops = student.view_logits.shape[0] // batch
    t_view, view_entropy = plain_targets(targets, teacher.view_logits, view_center, temp)
    q = t_view.chunk(num_global)
    s = (student.view_logits / 0.1).chunk(n_crops)
    t_region, entropy_sum, rows = [], 0.0, 0
    for logits in teacher.region_logits:
        probs, entropy = plain_targets(targets, logits.reshape(-1, logits.shape[-1]), region_center, temp)
        t_region.append(probs.view(logits.shape))
        entropy_sum, rows = entropy_sum + entropy * probs.shape[0], rows + probs.shape[0]
    total, pairs = 0.0, 0
    for iq in range(num_global):
        for v in range(n_crops):
            if v == iq:
                continue
            view = torch.sum(-q[iq] * F.log_softmax(s[v], dim=-1), dim=-1)
            sim = F.normalize(student.region_features[v], dim=-1) @ F.normalize(
                teacher.region_features[iq], dim=-1
            ).transpose(1, 2)
            idx = sim.max(dim=2)[1]  # [B, T_s]
            matched = torch.gather(t_region[iq], 1, idx.unsqueeze(-1).expand(-1, -1, t_region[iq].shape[-1]))
            region = torch.sum(-matched * F.log_softmax(student.region_logits[v] / 0.1, dim=-1), dim=-1).mean(-1)
            total = total + (0.5 * view + 0.5 * region).mean()
            pairs += 1
    return total / pairs, (view_entropy, entropy_sum / rows), pairs


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.mark.parametrize(
    "tokens",
    [[9, 9, 4, 4, 4], [16, 16, 9, 4, 1, 1]],  # 2 + 3 crops; three local resolutions
)
@pytest.mark.parametrize("targets", ["centering", "sinkhorn_knopp"])
def test_summed_loss_equals_the_per_pair_loss(seed, tokens, targets):
    g = torch.Generator().manual_seed(seed)
    student, teacher = random_outputs(batch=3, tokens=tokens, out_dim=48, feat_dim=8, seed=seed)
    loss_fn = EsViTLoss(48, region_chunk_size=int(torch.randint(1, 40, (), generator=g)), teacher_normalization=targets)
    loss_fn.view_center.normal_(generator=g)
    loss_fn.region_center.normal_(generator=g)
    centers = (loss_fn.view_center.clone(), loss_fn.region_center.clone())
    expected, expected_entropies, pairs = plain_loss(student, teacher, 0.05, *centers, targets=targets)
    out = loss_fn(student, teacher, teacher_temp=0.05)
    assert out.num_pairs == pairs == 2 * (len(tokens) - 1)
    assert_rel_close(out.loss, expected, "loss", seed)
    assert_rel_close(0.5 * out.view_loss + 0.5 * out.region_loss, expected.detach(), "loss parts", seed)
    assert_rel_close(out.teacher_view_entropy, expected_entropies[0], "teacher view entropy", seed)
    assert_rel_close(out.teacher_region_entropy, expected_entropies[1], "teacher region entropy", seed)
    inputs = [student.view_logits, *student.region_logits]
    for i, (got, want) in enumerate(zip(grads(out.loss, inputs), grads(expected, inputs))):
        assert_rel_close(got, want, f"gradient of student logits {i}", seed)
    # the centres move by the teacher's batch means, whatever the loss's composition
    view_mean = teacher.view_logits.mean(0, keepdim=True)
    region_mean = torch.cat([r.reshape(-1, 48) for r in teacher.region_logits]).mean(0, keepdim=True)
    assert_rel_close(loss_fn.view_center, 0.9 * centers[0] + 0.1 * view_mean, "view centre", seed)
    assert_rel_close(loss_fn.region_center, 0.9 * centers[1] + 0.1 * region_mean, "region centre", seed)


def plain_weight_norm(module: WeightNormLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight_g * module.weight_v / module.weight_v.norm(dim=1, keepdim=True))


def head_gradients(seed: int, dtype: torch.dtype, fused: bool):
    """Loss and head-parameter gradients of a 2 + 3 crop step through a view head and a dense
    head: fused weight norm + summed loss (`fused`) or separate ops + `plain_loss`."""
    g = torch.Generator().manual_seed(seed)
    batch, tokens, dim, out_dim = 2, [9, 9, 4, 4, 4], 12, 40
    torch.manual_seed(seed)
    head = DINOHead(dim, out_dim, norm_last_layer=False, hidden_dim=24, bottleneck_dim=8).to(dtype)
    dense = DINOHead(dim, out_dim, norm_last_layer=False, hidden_dim=24, bottleneck_dim=8).to(dtype)
    pooled = torch.randn(len(tokens) * batch, dim, generator=g, dtype=dtype)
    regions = [torch.randn(batch, n, dim, generator=g, dtype=dtype) for n in tokens]
    _, teacher = random_outputs(batch, tokens, out_dim, dim, seed=seed + 1)
    teacher = SimpleNamespace(
        view_logits=teacher.view_logits.to(dtype),
        region_logits=tuple(r.to(dtype) for r in teacher.region_logits),
        region_features=tuple(torch.randn(batch, n, dim, generator=g, dtype=dtype) for n in tokens[:2]),
    )
    last_layer = (lambda m, x: m(x)) if fused else plain_weight_norm

    def run(h, x):
        return last_layer(h.last_layer, F.normalize(h.mlp(x), dim=-1))

    student = SimpleNamespace(
        view_logits=run(head, pooled),
        region_logits=tuple(run(dense, r.reshape(-1, dim)).view(batch, r.shape[1], -1) for r in regions),
        region_features=tuple(regions),
    )
    if fused:
        loss = EsViTLoss(out_dim).to(dtype)(student, teacher, teacher_temp=0.07).loss
    else:
        zeros = torch.zeros(1, out_dim, dtype=dtype)
        loss = plain_loss(student, teacher, 0.07, zeros, zeros)[0]
    params = [*head.parameters(), *dense.parameters()]
    return loss, grads(loss, params), [tuple(p.shape) for p in params]


def test_heads_and_loss_together_equal_the_plain_composition(seed):
    """Loss and the gradient of every head parameter, fused vs plain.

    In float64 the two compositions agree to 1e-12 (the same mathematics). In float32 the loss
    agrees to 1e-6; a head-parameter gradient goes back through four layers, where float32
    rounding alone leaves the *plain* composition up to ~1.3e-6 from the float64 result (60
    seeds), so each fused gradient must be within 1e-6 of the float64 result or no further from
    it than twice the plain composition's own error.
    """
    loss64, fused64, shapes = head_gradients(seed, torch.float64, fused=True)
    plain_loss64, plain64, _ = head_gradients(seed, torch.float64, fused=False)
    assert ((loss64 - plain_loss64).abs() / plain_loss64.abs()).item() <= 1e-12, f"seed {seed}"
    for shape, a, b in zip(shapes, fused64, plain64):
        assert ((a - b).norm() / b.norm()).item() <= 1e-12, f"float64 gradient {shape} (seed {seed})"
    loss32, fused32, _ = head_gradients(seed, torch.float32, fused=True)
    plain_loss32, plain32, _ = head_gradients(seed, torch.float32, fused=False)
    assert_rel_close(loss32, plain_loss32, "loss", seed)
    for shape, f32, p32, exact in zip(shapes, fused32, plain32, plain64):
        fused_err = ((f32.double() - exact).norm() / exact.norm()).item()
        plain_err = ((p32.double() - exact).norm() / exact.norm()).item()
        assert fused_err <= max(RTOL, 2 * plain_err), (
            f"gradient {shape}: fused {fused_err:.2e} vs plain {plain_err:.2e} from float64 (seed {seed})"
        )


def test_several_targets_equal_the_sum_of_single_target_cross_entropies(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 7, 33, generator=g, requires_grad=True)
    teachers = [F.softmax(torch.randn(3, 5, 33, generator=g) * 4, dim=-1) for _ in range(3)]
    indices = [torch.randint(0, 5, (3, 7), generator=g) for _ in teachers]
    chunk = int(torch.randint(1, 30, (), generator=g))
    summed = matched_region_cross_entropy(student, teachers, indices, 0.1, chunk)
    separate = sum(matched_region_cross_entropy(student, t, i, 0.1, chunk) for t, i in zip(teachers, indices))
    assert_rel_close(summed, separate, "per-token cross-entropy", seed)
    weights = torch.rand(3, 7, generator=g)
    assert_rel_close(
        grads((summed * weights).sum(), [student])[0],
        grads((separate * weights).sum(), [student])[0],
        "gradient",
        seed,
    )


def test_single_target_is_the_plain_cross_entropy_and_chunks_change_nothing(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(11, 29, generator=g, requires_grad=True)
    teacher = F.softmax(torch.randn(6, 29, generator=g) * 3, dim=-1)
    index = torch.randint(0, 6, (11,), generator=g)
    plain = torch.sum(-teacher[index] * F.log_softmax(student / 0.1, dim=-1), dim=-1)
    results = [summed_cross_entropy(student, [(teacher, index)], 0.1, chunk) for chunk in (1, 4, 11, 100)]
    assert_rel_close(results[0], plain, "cross-entropy", seed)
    plain_grad = grads(plain.sum(), [student])[0]
    for r in results:
        torch.testing.assert_close(r, results[0], rtol=0, atol=0)  # chunking: bit for bit
        assert_rel_close(grads(r.sum(), [student])[0], plain_grad, "gradient", seed)


def test_half_precision_logits_are_upcast_like_the_plain_formula(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(9, 31, generator=g).bfloat16().requires_grad_()
    teacher = F.softmax(torch.randn(4, 31, generator=g) * 3, dim=-1)
    index = torch.randint(0, 4, (9,), generator=g)
    got = summed_cross_entropy(student, [(teacher, index), (teacher, index.flip(0))], 0.1, 4)
    log_p = F.log_softmax(student.float() / 0.1, dim=-1)
    want = torch.sum(-(teacher[index] + teacher[index.flip(0)]) * log_p, dim=-1)
    assert got.dtype == torch.float32
    assert_rel_close(got, want, "cross-entropy", seed)
    got_grad, want_grad = grads(got.sum(), [student])[0], grads(want.sum(), [student])[0]
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_grad, want_grad)  # both are bfloat16-rounded float32 gradients


@pytest.mark.parametrize("train_scale", [True, False])
def test_fused_weight_norm_equals_the_separate_ops(seed, train_scale):
    g = torch.Generator().manual_seed(seed)
    layer = WeightNormLinear(16, 300, train_scale=train_scale)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0, generator=g)
        layer.weight_v.normal_(generator=g)
    assert list(layer.state_dict()) == ["weight_g", "weight_v"]
    x = torch.randn(7, 16, generator=g, requires_grad=True)
    fused, plain = layer(x), plain_weight_norm(layer, x)
    assert_rel_close(fused, plain, "output", seed)
    assert_rel_close(
        layer.weight, layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True), "w", seed
    )
    grad_out = torch.randn(7, 300, generator=g)
    tensors = [x, layer.weight_v] + ([layer.weight_g] if train_scale else [])
    got = torch.autograd.grad(fused, tensors, grad_out)
    want = torch.autograd.grad(plain, tensors, grad_out)
    for name, a, b in zip(["input", "weight_v", "weight_g"], got, want):
        assert_rel_close(a, b, f"gradient of {name}", seed)
