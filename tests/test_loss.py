"""EsViTLoss: parity with the original DDINOLoss / DINOLoss, chunking, crop layouts, centres.

The original's values come from `loss_fixture.*` (three sequential calls on the same loss objects,
so the centres accumulate) and from an end-to-end call on the tiny Swin W7 reference model.
A direct, unchunked re-statement of the objective (`reference_loss` below) checks what the
fixture cannot: gradients, any number of crop resolutions, other chunk sizes.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from esvit.conversion.original import convert_original_loss_state_dict
from esvit.training.loss import EsViTLoss, matched_region_cross_entropy
from tests.reference import load_reference_state_dict, reference_config, split_heads, tiny_config

LOSS_RTOL = 1e-6


def crops_from_rows(rows: torch.Tensor, batch: int, tokens: list[int]) -> tuple[torch.Tensor, ...]:
    """Original row layout (crop-major, then image, then token) -> per-crop `[B, L_c, D]`."""
    parts = rows.split([batch * n for n in tokens])
    return tuple(p.reshape(batch, n, -1) for p, n in zip(parts, tokens))


def fixture_outputs(tensors: dict, layout: dict, step: int) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The fixture's 4-tuple inputs of one step in the per-crop layout of EsViTPreTrainingOutput."""
    b, ng, nl = layout["B"], layout["N_global_patches"], layout["N_local_patches"]
    s_tokens = [ng] * layout["n_global"] + [nl] * layout["n_local"]
    t_tokens = [ng] * layout["n_global"]
    t = {k: tensors[f"step{step}_{k}"] for k in ("s_cls", "s_region", "s_fea", "t_cls", "t_region", "t_fea")}
    student = SimpleNamespace(
        view_logits=t["s_cls"],
        region_logits=crops_from_rows(t["s_region"], b, s_tokens),
        region_features=crops_from_rows(t["s_fea"], b, s_tokens),
    )
    teacher = SimpleNamespace(
        view_logits=t["t_cls"],
        region_logits=crops_from_rows(t["t_region"], b, t_tokens),
        region_features=crops_from_rows(t["t_fea"], b, t_tokens),
    )
    return student, teacher


@pytest.fixture(scope="module")
def loss_fixture(reference_dir):
    meta = json.loads((reference_dir / "loss_fixture.json").read_text())
    return meta, load_file(reference_dir / "loss_fixture.safetensors")


def assert_loss_close(got: torch.Tensor, expected: float) -> None:
    rel = abs(got.item() - expected) / abs(expected)
    print(f"loss {got.item():.9f} vs original {expected:.9f}: rel diff {rel:.2e}")
    assert rel <= LOSS_RTOL


def test_matches_original_ddino_loss_over_three_steps(loss_fixture):
    meta, tensors = loss_fixture
    assert meta["constructor"]["student_temp"] == 0.1 and meta["constructor"]["center_momentum"] == 0.9
    loss_fn = EsViTLoss(meta["constructor"]["out_dim"], num_global_crops=2)
    for step_meta in meta["steps_sequential_same_loss_objects"]:
        i = step_meta["step"]
        student, teacher = fixture_outputs(tensors, meta["layout"], i)
        with torch.no_grad():
            out = loss_fn(student, teacher, teacher_temp=meta["teacher_temp_schedule"][step_meta["epoch"]])
        assert out.num_pairs == 2 * (meta["constructor"]["ncrops"] - 1)
        assert_loss_close(out.loss, step_meta["ddino_loss"])
        torch.testing.assert_close(out.loss, 0.5 * out.view_loss + 0.5 * out.region_loss)
        for ours, theirs in (("view_center", "ddino_center"), ("region_center", "ddino_center_grid")):
            expected = tensors[f"step{i}_{theirs}_after"]
            print(f"step {i} {ours}: max abs diff {(getattr(loss_fn, ours) - expected).abs().max().item():.2e}")
            torch.testing.assert_close(getattr(loss_fn, ours), expected, rtol=1e-6, atol=1e-7)


def test_view_only_mode_matches_original_dino_loss(loss_fixture):
    meta, tensors = loss_fixture
    loss_fn = EsViTLoss(meta["constructor"]["out_dim"], use_region_loss=False)
    for step_meta in meta["steps_sequential_same_loss_objects"]:
        i = step_meta["step"]
        student = SimpleNamespace(view_logits=tensors[f"step{i}_s_cls"], region_logits=None, region_features=None)
        teacher = SimpleNamespace(view_logits=tensors[f"step{i}_t_cls"], region_logits=None, region_features=None)
        with torch.no_grad():
            out = loss_fn(student, teacher, teacher_temp=meta["teacher_temp_schedule"][step_meta["epoch"]])
        assert out.region_loss is None and out.teacher_region_entropy is None
        assert_loss_close(out.loss, step_meta["dino_loss"])
        torch.testing.assert_close(loss_fn.view_center, tensors[f"step{i}_dino_center_after"], rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(loss_fn.region_center) == 0


# ---------------------------------------------------------------------- direct re-statement


def reference_loss(student, teacher, temp, view_center, region_center, num_global=2, use_region=True):
    """The objective written out per pair with full-size gathers (no chunking, plain autograd)."""
    batch = teacher.view_logits.shape[0] // num_global
    n_crops = student.view_logits.shape[0] // batch
    q = F.softmax((teacher.view_logits - view_center) / temp, dim=-1).chunk(num_global)
    s = (student.view_logits / 0.1).chunk(n_crops)
    total, pairs = 0.0, 0
    for iq in range(num_global):
        for v in range(n_crops):
            if v == iq:
                continue
            loss = torch.sum(-q[iq] * F.log_softmax(s[v], dim=-1), dim=-1)
            if use_region:
                sim = F.normalize(student.region_features[v], dim=-1) @ F.normalize(
                    teacher.region_features[iq], dim=-1
                ).transpose(1, 2)
                idx = sim.argmax(dim=2)  # [B, T_s]
                t_probs = F.softmax((teacher.region_logits[iq] - region_center) / temp, dim=-1)
                matched = torch.gather(t_probs, 1, idx.unsqueeze(-1).expand(-1, -1, t_probs.shape[-1]))
                region = torch.sum(-matched * F.log_softmax(student.region_logits[v] / 0.1, dim=-1), dim=-1)
                loss = 0.5 * loss + 0.5 * region.mean(-1)
            total = total + loss.mean()
            pairs += 1
    return total / pairs


def random_outputs(batch, tokens, out_dim, feat_dim, num_global=2, dtype=torch.float32, seed=0, grad=True):
    """Student outputs for crops with `tokens[c]` regions each, and the teacher's for the first crops."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    student = SimpleNamespace(
        view_logits=rand(len(tokens) * batch, out_dim).requires_grad_(grad),
        region_logits=tuple(rand(batch, n, out_dim).requires_grad_(grad) for n in tokens),
        region_features=tuple(rand(batch, n, feat_dim) for n in tokens),
    )
    teacher = SimpleNamespace(
        view_logits=rand(num_global * batch, out_dim),
        region_logits=tuple(rand(batch, n, out_dim) for n in tokens[:num_global]),
        region_features=tuple(rand(batch, n, feat_dim) for n in tokens[:num_global]),
    )
    return student, teacher


def student_grads(student, loss):
    inputs = [student.view_logits, *student.region_logits]
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize(
    "tokens",
    [
        [9, 9, 4, 4, 4],  # the original's two resolution groups
        [9, 9, 4, 4, 1, 1, 1],  # three resolution groups
        [16, 16, 9, 4, 1],  # a different size for every local crop
    ],
)
def test_loss_and_gradients_match_direct_statement(tokens):
    student, teacher = random_outputs(batch=3, tokens=tokens, out_dim=24, feat_dim=8)
    loss_fn = EsViTLoss(24, region_chunk_size=5)
    center_v, center_r = torch.randn(1, 24) * 0.3, torch.randn(1, 24) * 0.3
    loss_fn.view_center.copy_(center_v)
    loss_fn.region_center.copy_(center_r)
    expected = reference_loss(student, teacher, 0.05, center_v, center_r)
    out = loss_fn(student, teacher, teacher_temp=0.05)
    assert out.num_pairs == 2 * (len(tokens) - 1)
    torch.testing.assert_close(out.loss, expected)
    for got, want in zip(student_grads(student, out.loss), student_grads(student, expected)):
        torch.testing.assert_close(got, want)


def test_region_chunk_size_changes_nothing():
    student, teacher = random_outputs(batch=2, tokens=[9, 9, 4, 4], out_dim=32, feat_dim=8, seed=1)
    results = []
    for chunk in (1, 3, 7, 10_000):
        out = EsViTLoss(32, region_chunk_size=chunk)(student, teacher, teacher_temp=0.04)
        results.append((out.loss, *student_grads(student, out.loss)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_matched_region_cross_entropy_gradcheck():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = F.softmax(torch.randn(2, 3, 6, dtype=torch.float64, generator=g), dim=-1)
    index = torch.randint(0, 3, (2, 5), generator=g)
    assert torch.autograd.gradcheck(
        lambda s: matched_region_cross_entropy(s, teacher, index, 0.1, chunk_rows=3), (student,)
    )


def test_view_only_mode_ignores_region_outputs_and_weights():
    student, teacher = random_outputs(batch=2, tokens=[4, 4, 1], out_dim=16, feat_dim=4)
    out = EsViTLoss(16, use_region_loss=False)(student, teacher, teacher_temp=0.04)
    expected = reference_loss(student, teacher, 0.04, torch.zeros(1, 16), None, use_region=False)
    torch.testing.assert_close(out.loss, expected)


def test_centres_update_in_one_process_without_process_group():
    assert not (dist.is_available() and dist.is_initialized())
    student, teacher = random_outputs(batch=2, tokens=[9, 9, 4], out_dim=16, feat_dim=4, grad=False)
    loss_fn = EsViTLoss(16)
    loss_fn.view_center.fill_(1.0)
    loss_fn.region_center.fill_(-1.0)
    loss_fn(student, teacher, teacher_temp=0.04)
    view_mean = teacher.view_logits.mean(0, keepdim=True)
    region_mean = torch.cat([r.reshape(-1, 16) for r in teacher.region_logits]).mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.view_center, 0.9 * 1.0 + 0.1 * view_mean)
    torch.testing.assert_close(loss_fn.region_center, 0.9 * -1.0 + 0.1 * region_mean)
    assert set(loss_fn.state_dict()) == {"view_center", "region_center"}


def test_loss_is_not_affected_by_an_outer_autocast():
    student, teacher = random_outputs(batch=2, tokens=[4, 4, 1], out_dim=16, feat_dim=4, grad=False)
    plain = EsViTLoss(16)(student, teacher, teacher_temp=0.04).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = EsViTLoss(16)(student, teacher, teacher_temp=0.04).loss
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)


def test_bad_inputs_are_rejected_with_a_reason():
    student, teacher = random_outputs(batch=2, tokens=[4, 4, 1], out_dim=16, feat_dim=4, grad=False)
    with pytest.raises(ValueError, match="view_logits must be"):
        EsViTLoss(8)(student, teacher, teacher_temp=0.04)
    with pytest.raises(ValueError, match="num_global_crops"):
        EsViTLoss(16, num_global_crops=3)(student, teacher, teacher_temp=0.04)
    no_regions = SimpleNamespace(view_logits=student.view_logits, region_logits=None, region_features=None)
    with pytest.raises(ValueError, match="use_region_loss=False"):
        EsViTLoss(16)(no_regions, teacher, teacher_temp=0.04)
    truncated = tuple(f[:, :1] for f in student.region_features)
    bad_features = SimpleNamespace(**{**vars(student), "region_features": truncated})
    with pytest.raises(ValueError, match="region_features"):
        EsViTLoss(16)(bad_features, teacher, teacher_temp=0.04)


def test_original_loss_state_converts():
    state = {"center": torch.ones(1, 4), "center_grid": torch.full((1, 4), 2.0)}
    loss_fn = EsViTLoss(4)
    loss_fn.load_state_dict(convert_original_loss_state_dict(state))
    assert loss_fn.view_center.eq(1).all() and loss_fn.region_center.eq(2).all()
    dino_only = convert_original_loss_state_dict({"center": torch.ones(1, 4)})
    assert dino_only["region_center"].eq(0).all()
    with pytest.raises(KeyError, match="unexpected"):
        convert_original_loss_state_dict({"centre": torch.ones(1, 4)})


# ---------------------------------------------------------------------- two processes


def _two_process_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Rank 1 has a smaller batch: the centre must be the mean over all rows of both processes.
        student, teacher = random_outputs(
            batch=2 + rank, tokens=[4, 4, 1], out_dim=8, feat_dim=4, seed=rank, grad=False
        )
        loss_fn = EsViTLoss(8)
        loss_fn(student, teacher, teacher_temp=0.04)
        result = {"view": loss_fn.view_center, "region": loss_fn.region_center, "teacher": teacher}
        torch.save(result, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_centres_are_averaged_over_processes(tmp_path):
    init_file, result_file = str(tmp_path / "init"), str(tmp_path / "result")
    mp.spawn(_two_process_worker, args=(init_file, result_file), nprocs=2, join=True)
    results = [torch.load(f"{result_file}.{r}", weights_only=False) for r in range(2)]
    view_rows = torch.cat([r["teacher"].view_logits for r in results])
    region_rows = torch.cat([t.reshape(-1, 8) for r in results for t in r["teacher"].region_logits])
    for r in results:
        torch.testing.assert_close(r["view"], 0.1 * view_rows.mean(0, keepdim=True))
        torch.testing.assert_close(r["region"], 0.1 * region_rows.mean(0, keepdim=True))


# ---------------------------------------------------------------------- end to end


def test_end_to_end_tiny_swin_matches_original(reference_dir, reference_manifest, reference_inputs):
    from esvit.conversion.swin import original_swin_to_esvit
    from esvit.modeling_esvit import EsViTForPreTraining

    meta = json.loads((reference_dir / "loss_fixture.json").read_text())["end_to_end_swin_tiny_w7"]
    backbone, heads = split_heads(load_reference_state_dict(reference_dir, reference_manifest, "swin_tiny_w7"))
    converted = {f"esvit.{k}": v for k, v in original_swin_to_esvit(backbone).items()} | heads
    config = reference_config(reference_manifest, "swin_tiny_w7")
    model = EsViTForPreTraining(config).eval()
    model.load_state_dict(converted, strict=True)
    x = reference_inputs
    loss_fn = EsViTLoss(64, num_global_crops=2)
    with torch.no_grad():
        student = model([x["global_view1"], x["global_view2"], x["local_view1"], x["local_view2"]])
        teacher = model([x["global_view1"], x["global_view2"]])
        out = loss_fn(student, teacher, teacher_temp=0.04)
    assert_loss_close(out.loss, meta["loss"])
    centers = load_file(reference_dir / meta["centers_file"])
    for ours, theirs in (("view_center", "center_after"), ("region_center", "center_grid_after")):
        print(f"e2e {ours}: max abs diff {(getattr(loss_fn, ours) - centers[theirs]).abs().max().item():.2e}")
        torch.testing.assert_close(getattr(loss_fn, ours), centers[theirs], rtol=1e-5, atol=1e-6)


def test_one_training_step_moves_the_student_and_the_teacher():
    """Loss, param groups, clipping, last-layer freezing and the EMA together on a tiny model."""
    from esvit.modeling_esvit import EsViTForPreTraining
    from esvit.training.optim import cancel_last_layer_gradients, clip_gradients, get_param_groups, update_teacher

    torch.manual_seed(0)
    config = tiny_config(
        "swin",
        depths=(1, 1, 1, 1),
        head_out_dim=32,
        head_hidden_dim=16,
        head_bottleneck_dim=8,
        head_norm_last_layer=False,
    )
    student, teacher = EsViTForPreTraining(config), EsViTForPreTraining(config)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    crops = [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224), torch.randn(2, 3, 96, 96)]
    loss_fn = EsViTLoss(32)
    optimizer = torch.optim.AdamW(get_param_groups(student), lr=1e-3)
    with torch.no_grad():
        teacher_out = teacher(crops[:2])
    out = loss_fn(student(crops), teacher_out, teacher_temp=0.04)
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    clip_gradients(student, 3.0)
    cancel_last_layer_gradients(student, step=0, freeze_last_layer_steps=1)
    last_layer_before = student.head.last_layer.weight_v.clone()
    backbone_before = student.esvit.encoder.patch_embed.proj.weight.clone()
    optimizer.step()
    assert torch.equal(student.head.last_layer.weight_v, last_layer_before)  # frozen during step 0
    assert not torch.equal(student.esvit.encoder.patch_embed.proj.weight, backbone_before)
    update_teacher(student, teacher, momentum=0.9)
    torch.testing.assert_close(
        teacher.esvit.encoder.patch_embed.proj.weight,
        0.9 * backbone_before + 0.1 * student.esvit.encoder.patch_embed.proj.weight,
    )
    assert torch.isfinite(out.loss) and 0 < out.teacher_view_entropy <= torch.log(torch.tensor(32.0)) + 1e-4


def test_deferred_centre_update_equals_one_large_batch():
    """Gradient accumulation: micro-batches with update_centers=False, then step_centers(), move
    the centres exactly as one call on the whole batch does (and the loss values are unchanged)."""
    from esvit.training.loss import EsViTLoss

    tokens = [4, 4, 2, 2]
    student, teacher = random_outputs(4, tokens, out_dim=16, feat_dim=8, grad=False)

    def half(out, part, num_crops):
        rows = out.view_logits.view(num_crops, 4, -1)[:, 2 * part : 2 * part + 2].reshape(-1, 16)
        regions = tuple(r[2 * part : 2 * part + 2] for r in out.region_logits)
        feats = tuple(f[2 * part : 2 * part + 2] for f in out.region_features)
        return SimpleNamespace(view_logits=rows, region_logits=regions, region_features=feats)

    whole = EsViTLoss(out_dim=16)
    whole.view_center.normal_()  # start away from zero so the EMA term is exercised
    whole.region_center.normal_()
    parts = EsViTLoss(out_dim=16)
    parts.load_state_dict(whole.state_dict())
    whole(student, teacher, teacher_temp=0.05)
    for part in (0, 1):
        before = parts.view_center.clone()
        parts(half(student, part, 4), half(teacher, part, 2), teacher_temp=0.05, update_centers=False)
        torch.testing.assert_close(parts.view_center, before, rtol=0, atol=0)  # nothing moves yet
    parts.step_centers()
    torch.testing.assert_close(parts.view_center, whole.view_center)
    torch.testing.assert_close(parts.region_center, whole.region_center)
    parts.step_centers()  # nothing pending: a no-op
    torch.testing.assert_close(parts.view_center, whole.view_center)
