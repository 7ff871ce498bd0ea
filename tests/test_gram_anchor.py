"""Gram anchoring in DINO (DINOv3, issue 19 part 2): the Gram teacher is a frozen snapshot of the EMA
teacher's backbone, taken and refreshed at exactly the scheduled steps; the loss part equals a Gram
MSE written from the formula on independently computed patch features; resume is bit-identical; the
augmenters' Gram teacher's crops are the undistorted large crops that the student's global views are
downsampled from."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from dino_pytorch import DINO, BatchedMultiCrop, GramAnchor, MultiCropRecipe, MultiCropTransform
from dino_pytorch.augment import functional as AF
from dino_pytorch.gram_anchor import gram_weight_schedule
from dino_pytorch.ibot import IBOTConfig
from dino_pytorch.models import ConvNet, dinov2_vit_small

B = 3


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return dinov2_vit_small(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2, init_values=1.0)


def tiny_dino(gram, ibot=None, seed=0):
    dino = DINO(tiny_vit(seed), out_dim=16, hidden_dim=16, bottleneck_dim=8, input_size=(1, 16, 16), ibot=ibot,
                gram=gram)
    return dino, torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.5)


def make_views(step, scale=2):
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(B, 1, 16, 16, generator=g) for _ in range(2)] + [torch.randn(B, 1, 8, 8, generator=g)]
    return views, [torch.randn(B, 1, 16 * scale, 16 * scale, generator=g) for _ in range(2)]


def one_step(dino, opt, views=None, gram_views=None):
    if views is None:
        views, gram_views = make_views(dino.step)
    loss = dino(views, gram_views=gram_views)
    opt.zero_grad()
    loss.backward()
    dino.optimizer_step(opt)
    dino.update_teacher()
    return loss


def snapshot(dino):
    return [t.clone() for t in dino.gram_teacher.backbone.state_dict().values()]


def teacher_weights(dino):
    return list(dino.teacher_backbone.state_dict().values())


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- the schedule -------------------------------------------------------------------------------------

def dinov3_refresh_steps(start, every, first, most, steps):
    """Our steps (after the update) at which DINOv3's loop refreshes: after iteration ``it`` when
    ``(it + 1) >= it_first_update``, ``(it + 1) % update_frequency == 0`` and fewer than ``max_updates``;
    here only once the snapshot exists (``it + 1 > start``)."""
    done = []
    for it in range(steps):
        if it + 1 > start and it + 1 >= first and (it + 1) % every == 0 and (most is None or len(done) < most):
            done.append(it + 1)
    return done


@pytest.mark.parametrize("start, every, first, most", [(0, 3, 0, None), (2, 3, 0, 2), (5, 2, 9, 3), (4, 4, 0, 0)])
def test_refreshes_due_counts_dinov3s_schedule(start, every, first, most):
    anchor = GramAnchor(start_step=start, refresh_every=every, first_refresh_step=first, max_refreshes=most)
    points = dinov3_refresh_steps(start, every, first, most, 40)
    assert [anchor.refreshes_due(s) for s in range(41)] == [sum(p <= s for p in points) for s in range(41)]
    assert GramAnchor(start_step=start).refreshes_due(40) == 0  # refresh_every=None: never


def test_snapshot_taken_at_start_and_refreshed_only_at_scheduled_steps():
    dino, opt = tiny_dino(GramAnchor(start_step=2, refresh_every=3, max_refreshes=2))
    assert not bool(dino.gram_teacher.taken)
    refreshed, equal_after = [], []
    for _ in range(10):
        step, before = dino.step, snapshot(dino)
        teacher_before = [t.clone() for t in teacher_weights(dino)]
        views, gram_views = make_views(step)
        loss = dino(views, gram_views=gram_views)
        if step == 2:  # taken in the forward of the start step, from the EMA teacher as it was then
            assert bool(dino.gram_teacher.taken) and same(snapshot(dino), teacher_before)
            assert not same(before, teacher_before)
        elif step < 2:
            assert not bool(dino.gram_teacher.taken) and dino.loss_parts["gram_weight"] == 0
        after_forward = snapshot(dino)
        assert step <= 2 or same(after_forward, before)  # a forward changes nothing once taken
        opt.zero_grad()
        loss.backward()
        dino.optimizer_step(opt)
        dino.update_teacher()
        if not same(snapshot(dino), after_forward):
            refreshed.append(dino.step)
        equal_after.append(same(snapshot(dino), teacher_weights(dino)))
    assert refreshed == [3, 6] == dinov3_refresh_steps(2, 3, 0, 2, 10)
    assert int(dino.gram_teacher.refreshes) == 2
    assert [i + 1 for i, e in enumerate(equal_after) if e] == [3, 6]  # bit-equal to the EMA teacher right after


def test_gram_teacher_is_frozen_and_outside_the_optimizer():
    dino, opt = tiny_dino(GramAnchor())
    dino.train()
    for _ in range(2):
        one_step(dino, opt)
    gram_params = list(dino.gram_teacher.parameters())
    assert not dino.gram_teacher.training and not dino.gram_teacher.backbone.training
    assert all(not p.requires_grad and p.grad is None for p in gram_params)
    trained = {id(p) for p in dino.parameters() if p.requires_grad}
    assert not trained & {id(p) for p in gram_params}
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(gram_params, dino.teacher_backbone.parameters()))


def test_a_nonfinite_step_defers_the_refresh_to_the_next_finite_one():
    dino, opt = tiny_dino(GramAnchor(refresh_every=2))
    one_step(dino, opt)  # step 0: the snapshot is taken
    before = snapshot(dino)
    views, gram_views = make_views(1)
    views[0] = views[0].clone().fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        one_step(dino, opt, views, gram_views)  # the update to step 2 is due a refresh, but skipped
    assert dino.step == 2 and int(dino.gram_teacher.refreshes) == 0 and same(snapshot(dino), before)
    one_step(dino, opt)  # the next finite step refreshes
    assert int(dino.gram_teacher.refreshes) == 1 and same(snapshot(dino), teacher_weights(dino))


def test_a_given_snapshot_is_kept_at_the_start_step_and_a_loaded_state_is_followed():
    earlier, _ = tiny_dino(None, seed=3)
    dino, opt = tiny_dino(GramAnchor(start_step=1))
    dino.gram_teacher.load_snapshot(earlier.teacher_backbone.state_dict())  # DINOv3's gram.ckpt
    for _ in range(2):
        one_step(dino, opt)
    assert same(snapshot(dino), teacher_weights(earlier)) and not same(snapshot(dino), teacher_weights(dino))
    copy_, _ = tiny_dino(GramAnchor(start_step=1, refresh_every=1), seed=4)
    copy_.load_state_dict(dino.state_dict())  # the whole DINO: the host's view of the buffers follows
    assert same(snapshot(copy_), snapshot(dino)) and bool(copy_.gram_teacher.taken)
    one_step(copy_, torch.optim.SGD([p for p in copy_.parameters() if p.requires_grad], lr=0.5))
    assert int(copy_.gram_teacher.refreshes) == 1 and same(snapshot(copy_), teacher_weights(copy_))


# -- the loss --------------------------------------------------------------------------------------------

def reference_gram_loss(student, teacher, img_level=True):
    """mean((G_s - G_t)^2) of the L2-normalised float64 features, per image or over the batch."""
    s, t = F.normalize(student.double(), dim=-1), F.normalize(teacher.double(), dim=-1)
    if not img_level:
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    return ((s @ s.transpose(-1, -2) - t @ t.transpose(-1, -2)) ** 2).mean()


def bicubic_grid(tokens, grid, to):
    """(B, h*w, D) tokens laid out as (B, D, h, w) and interpolated bicubically, as DINOv3 resizes them."""
    image = tokens.double().transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)
    out = F.interpolate(image, size=(to, to), mode="bicubic", align_corners=False)
    return out.reshape(tokens.shape[0], -1, to * to).transpose(1, 2)


@pytest.mark.parametrize("with_ibot, with_gram_views", [(True, True), (False, False)])
def test_the_loss_part_is_gram_loss_of_the_patch_features(with_ibot, with_gram_views):
    ibot = IBOTConfig(out_dim=8, mask_probability=1.0) if with_ibot else None
    dino, _ = tiny_dino(GramAnchor(weight=0.7), ibot=ibot)
    views, gram_views = make_views(0)
    gram_views = gram_views if with_gram_views else None
    masks = torch.rand(2 * B, 16, generator=torch.Generator().manual_seed(3)) < 0.4 if with_ibot else None
    teacher = copy.deepcopy(dino.teacher_backbone).eval()
    with torch.no_grad():
        student = dino.backbone.forward_features(torch.cat(views[:2]), masks=masks)["x_norm_patchtokens"]
        target = teacher.forward_features(torch.cat(gram_views or views[:2]))["x_norm_patchtokens"]
    if with_gram_views:
        target = bicubic_grid(target, 8, 4)
    loss = dino(views, masks=masks, gram_views=gram_views)
    parts = dino.loss_parts
    expected = reference_gram_loss(student, target)
    assert parts["gram_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    total = parts["dino_loss"] + parts.get("ibot_loss", 0.0) + 0.7 * parts["gram_loss"]
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    assert set(parts) == {"dino_loss", "gram_loss", "gram_weight"} | ({"ibot_loss"} if with_ibot else set())


@pytest.mark.parametrize("tokens_used", ["masked", "unmasked"])
def test_tokens_used_selects_the_ibot_masked_or_unmasked_patches(tokens_used):
    gram = GramAnchor(img_level=False, tokens_used=tokens_used, remove_neg=True)
    dino, _ = tiny_dino(gram, ibot=IBOTConfig(out_dim=8))
    views, gram_views = make_views(0, scale=1)
    masks = torch.rand(2 * B, 16, generator=torch.Generator().manual_seed(4)) < 0.5
    keep = masks if tokens_used == "masked" else ~masks
    with torch.no_grad():
        student = dino.backbone.forward_features(torch.cat(views[:2]), masks=masks)["x_norm_patchtokens"][keep]
        target = dino.teacher_backbone.forward_features(torch.cat(gram_views))["x_norm_patchtokens"][keep]
    dino(views, masks=masks, gram_views=gram_views)
    s, t = F.normalize(student.double(), dim=-1), F.normalize(target.double(), dim=-1)
    expected = ((s @ s.T).clamp(min=0) - (t @ t.T).clamp(min=0)).pow(2).mean()  # remove_neg: both clipped
    assert dino.loss_parts["gram_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_weight_schedule_and_start():
    anchor = GramAnchor(weight=[0.5, 1.0, 2.0], start_step=1)
    assert [anchor.weight_at(s) for s in range(5)] == [0.0, 1.0, 2.0, 2.0, 2.0]
    schedule = gram_weight_schedule(0.0, 0.5, 2.0, warmup_steps=3, total_steps=10, cosine_steps=4)
    cosine = [2.0 + (0.5 - 2.0) * (1 + math.cos(math.pi * i / 3)) / 2 for i in range(4)]
    assert schedule.tolist() == pytest.approx([0.0, 0.5 / 3, 1.0 / 3] + cosine + [2.0] * 3, abs=1e-12)
    dino, opt = tiny_dino(GramAnchor(weight=schedule, start_step=2))
    seen = []
    for _ in range(5):
        one_step(dino, opt)
        seen.append(dino.loss_parts["gram_weight"].item())
    assert seen == pytest.approx([0.0, 0.0] + schedule[2:5].tolist())


def test_resume_is_bit_identical():
    gram = GramAnchor(weight=0.5, start_step=1, refresh_every=2, max_refreshes=2)
    dino, opt = tiny_dino(gram, ibot=IBOTConfig(out_dim=8))
    for _ in range(3):
        one_step(dino, opt)
    buffer = io.BytesIO()
    torch.save(dino.official_checkpoint(opt, epoch=0), buffer)
    for _ in range(4):
        one_step(dino, opt)
    resumed, resumed_opt = tiny_dino(gram, ibot=IBOTConfig(out_dim=8), seed=5)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert int(saved["gram_teacher"]["refreshes"]) == 1 and bool(saved["gram_teacher"]["taken"])
    resumed.load_official_checkpoint(saved)
    resumed_opt.load_state_dict(saved["optimizer"])
    for _ in range(4):
        one_step(resumed, resumed_opt)
    assert dino.state_dict().keys() == resumed.state_dict().keys()
    for a, b in zip(dino.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert int(resumed.gram_teacher.refreshes) == 2


# -- the errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, words", [
    (lambda: DINO(ConvNet(in_chans=1), out_dim=8, input_size=(1, 16, 16), gram=GramAnchor()), TypeError,
     "gram= needs a ViT"),
    (lambda: tiny_dino(GramAnchor(img_level=False, tokens_used="masked")), ValueError, "without ibot="),
    (lambda: DINO(tiny_vit(), out_dim=8, input_size=(1, 16, 16), fused_head_loss=True, gram=GramAnchor()),
     ValueError, "fused_head_loss=True with gram="),
    (lambda: DINO(tiny_vit(), out_dim=8, input_size=(1, 16, 16), gram={"weight": 1}), TypeError, "GramAnchor"),
    (lambda: GramAnchor(tokens_used="masked"), ValueError, "expected img_level=False"),
    (lambda: GramAnchor(weight=-1.0), ValueError, "weight=-1.0"),
    (lambda: GramAnchor(weight=[]), ValueError, "non-empty"),
    (lambda: GramAnchor(refresh_every=0), ValueError, "refresh_every=0"),
    (lambda: GramAnchor(teacher_scale=0), ValueError, "teacher_scale=0"),
    (lambda: GramAnchor(remove_neg=True, remove_only_teacher_neg=True), ValueError, "at most one"),
    (lambda: MultiCropRecipe(gram_teacher_scale=-2.0), ValueError, "gram_teacher_scale=-2.0"),
    (lambda: tiny_dino(GramAnchor())[0].distribute(strategy="fsdp"), ValueError, "strategy='fsdp' with gram="),
    (lambda: DINO(tiny_vit(), out_dim=8, input_size=(1, 16, 16))(make_views(0)[0], gram_views=make_views(0)[1]),
     ValueError, "without gram="),
    (lambda: tiny_dino(GramAnchor())[0](make_views(0)[0], gram_views=make_views(0)[1][:1]), ValueError,
     "expected a list of 2"),
])
def test_bad_configuration_is_one_line(make, error, words):
    with pytest.raises(error, match=words) as info:
        make()
    assert "\n" not in str(info.value)


# -- the augmenters' Gram teacher's crops -------------------------------------------------------------

PLAIN = dict(color_jitter_prob=0.0, grayscale_prob=0.0, global_blur_probs=(0.0,), global_solarize_probs=(0.0,),
             local_blur_prob=0.0)
MEAN, STD = (0.5,), (0.25,)


def recipe(**options):
    return MultiCropRecipe((0.3, 1.0), (0.1, 0.3), 2, global_crop_size=8, local_crop_size=4, mean=MEAN, std=STD,
                           **options)


def test_batched_gram_crops_are_undistorted_and_the_globals_their_downsampled_copies():
    images = torch.rand(4, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    on = BatchedMultiCrop(recipe=recipe(gram_teacher_scale=2.0, **PLAIN))
    views, params = on(images, generator=torch.Generator().manual_seed(1), return_params=True)
    assert [tuple(v.shape) for v in views] == [(4, 1, 8, 8)] * 2 + [(4, 1, 4, 4)] * 2 + [(4, 1, 16, 16)] * 2
    for i in range(2):
        base = AF.resized_crop(images, params[i].boxes, params[i].flip, (16, 16), on.recipe.interpolation)
        assert torch.equal(views[4 + i], AF.normalize(base, MEAN, STD))
        whole = torch.tensor([[0, 0, 16, 16]]).expand(4, 4)
        small = AF.resized_crop(base, whole, torch.zeros(4, dtype=torch.bool), (8, 8), on.recipe.interpolation)
        assert torch.equal(views[i], AF.normalize(small, MEAN, STD))
    # Distortions on: the Gram crops stay the plain crops; the draws, and so the local views, are unchanged.
    distorted = dict(color_jitter_prob=1.0, global_blur_probs=(1.0,), global_solarize_probs=(1.0,))
    jittered = BatchedMultiCrop(recipe=recipe(gram_teacher_scale=2.0, **distorted))
    off = BatchedMultiCrop(recipe=recipe(**distorted))
    views_j = jittered(images, generator=torch.Generator().manual_seed(1))
    views_off = off(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(views_j[4], views[4]) and not torch.equal(views_j[0], views[0])
    assert len(views_off) == 4 and all(torch.equal(a, b) for a, b in zip(views_j[2:4], views_off[2:4]))


@pytest.mark.parametrize("kind", ["float", "uint8", "pil"])
def test_per_image_gram_crops_are_undistorted(kind):
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    image = torch.rand(1, 20, 20, generator=torch.Generator().manual_seed(0))
    image = image if kind == "float" else (image * 255).round().to(torch.uint8)
    image = Image.fromarray(image[0].numpy(), mode="L") if kind == "pil" else image
    options = dict(color_jitter_prob=1.0, global_blur_probs=(1.0,), global_solarize_probs=(1.0,))
    transform = MultiCropTransform(recipe=recipe(gram_teacher_scale=1.5, **options))
    torch.manual_seed(7)
    views = transform(image)
    assert [tuple(v.shape) for v in views] == [(1, 8, 8)] * 2 + [(1, 4, 4)] * 2 + [(1, 12, 12)] * 2
    torch.manual_seed(7)  # the first view's draws: its crop box, then its flip
    top, left, h, w = transform.sample_crop_params(20, 20)
    flip = float(torch.empty((), dtype=torch.float64).uniform_()) < transform.recipe.flip_prob
    interpolation = transform.recipe.interpolation
    if kind == "float":
        box = torch.tensor([[top, left, h, w]])
        base = AF.resized_crop(image.unsqueeze(0), box, torch.tensor([flip]), (12, 12), interpolation)[0]
    else:
        base = AF.resized_crop_image(image, top, left, h, w, (12, 12), interpolation)
        base = TF.horizontal_flip(base) if flip else base
        base = AF.to_unit_float(TF.pil_to_tensor(base) if kind == "pil" else base)
    assert torch.equal(views[4], AF.normalize(base, MEAN, STD))


def test_per_image_global_is_the_resized_gram_crop_without_distortions():
    image = (torch.rand(1, 20, 20, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    transform = MultiCropTransform(recipe=recipe(gram_teacher_scale=2.0, **PLAIN))
    views = transform(image)
    base = (views[4] * STD[0] + MEAN[0]).mul(255).round().to(torch.uint8)  # the uint8 crop, exactly
    small = AF.resized_crop_image(base, 0, 0, 16, 16, (8, 8), transform.recipe.interpolation)
    assert torch.equal(views[0], AF.normalize(AF.to_unit_float(small), MEAN, STD))


# -- dino-train ------------------------------------------------------------------------------------------

GRAM_RUN = ["--dataset", "fashion_mnist", "--arch", "dinov2_vit_small", "--patch_size", "4", "--vit_depth", "1",
            "--vit_embed_dim", "12", "--out_dim", "32", "--hidden_dim", "16", "--bottleneck_dim", "8",
            "--batch_size_per_gpu", "4", "--local_crops_number", "1", "--num_workers", "0", "--no_final_knn",
            "--no_progress", "--log_every", "1", "--warmup_epochs", "0", "--freeze_last_layer", "0", "--lr", "0.01",
            "--max_steps", "4", "--attention_maps", "0", "--save_every_min", "0", "--saveckp_freq", "0"]


@pytest.mark.parametrize("argv, words", [
    (["--gram_refresh_every", "5"], ["--gram_refresh_every 5", "Gram anchoring is off", "--gram_weight"]),
    (["--gram_weight", "1", "--arch", "convnet"], ["--gram_weight 1.0", "dinov2_vit_* arch", "convnet"]),
    (["--gram_weight", "-1"], ["--gram_weight -1.0", ">= 0"]),
    (["--gram_weight", "1", "--gram_refresh_every", "0"], ["--gram_refresh_every 0", "a positive int"]),
    (["--gram_weight", "1", "--gram_teacher_scale", "1.1"], ["--gram_teacher_scale 1.1", "31 px", "--patch_size 4"]),
    (["--gram_weight", "1", "--fused_head_loss", "true"], ["--fused_head_loss True", "--gram_weight 1.0"]),
])
def test_a_bad_gram_flag_is_one_line_naming_it(argv, words, capsys, tmp_path):
    from dino_pytorch.cli import train

    with pytest.raises(SystemExit) as exit_:
        train.main([*GRAM_RUN, *argv, "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dino-train: error: "), lines
    assert all(word in lines[0] for word in words), lines[0]


def test_dino_train_logs_the_gram_loss_and_saves_the_snapshot(tmp_path):
    import json

    from dino_pytorch.cli import train
    from train_cases import load

    threads = torch.get_num_threads()
    try:  # in this process: a subprocess would spend most of the test importing torch
        assert train.main([*GRAM_RUN, "--gram_weight", "0.5", "--gram_start_step", "1", "--gram_refresh_every", "2",
                           "--output_dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert [r["gram_weight"] for r in steps] == [0.0, 0.5, 0.5, 0.5]  # step 0's forward is before the start
    for r in steps:
        assert r["train_loss"] == pytest.approx(r["dino_loss"] + r["gram_weight"] * r["gram_loss"], rel=1e-5)
    saved = load(tmp_path / "checkpoint.pth")
    assert bool(saved["gram_teacher"]["taken"]) and int(saved["gram_teacher"]["refreshes"]) == 2  # steps 2, 4


def test_a_resume_must_keep_gram_anchoring_on_or_off(tmp_path):
    from dino_pytorch.cli._setup import UsageError
    from dino_pytorch.cli.train_checkpoint import check_same_gram

    with_gram, without = tiny_dino(GramAnchor())[0], tiny_dino(None)[0]
    saved = with_gram.official_checkpoint(None, 0, args={"gram_weight": 1.0})
    check_same_gram(saved, with_gram, tmp_path)
    with pytest.raises(UsageError, match=r"with Gram anchoring \(--gram_weight 1.0\), and this run has --gram_weight"):
        check_same_gram(saved, without, tmp_path)
    with pytest.raises(UsageError, match="trained without Gram anchoring, and this run has --gram_weight > 0"):
        check_same_gram(without.official_checkpoint(None, 0), with_gram, tmp_path)


def test_the_docs_snippet_runs(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "dinov3.md").read_text(encoding="utf-8")
    code = text.split("## Gram anchoring in training")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "docs/dinov3.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[-1]) for line in lines] == [0, 0, 1, 1, 1, 2, 2]  # refreshed at steps 3 and 6
    assert float(lines[0].split()[2]) == 0.0 and float(lines[-1].split()[2]) > 0  # no Gram loss before step 2
