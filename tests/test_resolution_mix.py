"""DINOv3's high-resolution stage: the size triple of each batch is drawn at its ratio from (seed, step,
micro) alone (every rank, a resume), both augmenters make the views at the drawn sizes, tiny ViTs train
at two sizes (their position tables interpolated), dino-train's flags (one-line errors) and a resume
inside the stage that is bit-identical."""
from __future__ import annotations

import dataclasses
import math
import signal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dino_pytorch.cli.train_checkpoint as checkpointing
from dino_pytorch import DINO
from dino_pytorch.augment import BatchedMultiCrop, MultiCropRecipe, MultiCropTransform
from dino_pytorch.augment.resolution_mix import (
    ByTripleDataset,
    MixedResolutionBatchSampler,
    MixedResolutionCrops,
    ResolutionMix,
    SizeTriple,
)
from dino_pytorch.cli import train
from dino_pytorch.datasets import SeededTransform, sample_seeds
from dino_pytorch.models import dinov2_vit_small, vit_tiny
from dino_pytorch.sampler import ResumableSampler
from train_cases import in_process_usage_error as one_line_error

# DINOv3's high_res_adapt mix (512/768 global, 1.5x Gram crops, its ratios) at 7-px patches and 28/42 px.
MIX = ResolutionMix([28, 42, 42, 42, 42], [14, 14, 21, 28, 35], [0.3, 0.3, 0.3, 0.05, 0.05],
                    gram_sizes=[42, 63, 63, 63, 63], seed=3)
RECIPE = MultiCropRecipe(local_crops_number=2, mean=(0.5,), std=(0.25,))


def test_each_triple_is_drawn_at_its_ratio():
    draws = [MIX.index(step, micro) for step in range(1000) for micro in range(2)]
    n = len(draws)
    for i, p in enumerate(MIX.probabilities):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(draws.count(i) - n * p) <= 4 * sigma, (i, draws.count(i), n * p)
    assert MIX.probabilities == pytest.approx((0.3, 0.3, 0.3, 0.05, 0.05))
    skewed = ResolutionMix([28, 42, 56], [14, 14, 14], [3, 0, 1])  # unnormalised; a 0 is never drawn
    counts = [sum(skewed.index(s) == i for s in range(2000)) for i in range(3)]
    assert counts[1] == 0 and abs(counts[0] - 1500) <= 4 * math.sqrt(2000 * 0.75 * 0.25), counts


def test_the_draw_is_a_pure_function_of_seed_step_and_micro():
    again = ResolutionMix(list(MIX.global_sizes), list(MIX.local_sizes), list(MIX.ratios),
                          gram_sizes=list(MIX.gram_sizes or ()), seed=3)
    keys = [(s, m) for s in (0, 1, 7, 10**6) for m in range(3)]
    assert [MIX.index(s, m) for s, m in reversed(keys)] == [again.index(s, m) for s, m in reversed(keys)]
    assert MIX.triple(5, 1) == MIX.triples[MIX.index(5, 1)] == SizeTriple(*MIX.triples[MIX.index(5, 1)])
    other_seed = dataclasses.replace(MIX, seed=4)
    assert [MIX.index(s) for s in range(200)] != [other_seed.index(s) for s in range(200)]
    assert [MIX.index(s, 0) for s in range(200)] != [MIX.index(s, 1) for s in range(200)]


def per_image_loader(mix, sampler, accum, images):
    base = TensorDataset(images, torch.zeros(len(images)))
    per_triple = [SeededTransform(base, MultiCropTransform(recipe=r), seed=mix.seed, return_key=True)
                  for r in mix.recipes(RECIPE)]
    return DataLoader(ByTripleDataset(per_triple), batch_sampler=MixedResolutionBatchSampler(sampler, mix, accum))


def test_every_rank_and_a_resumed_epoch_draw_the_same_triples_as_the_batched_path():
    accum, seen = 2, {}
    for rank in (0, 1):
        sampler = ResumableSampler(24, 2, seed=3, rank=rank, world_size=2)  # 6 batches: 3 steps an epoch
        sampler.set_epoch(1)
        batches = MixedResolutionBatchSampler(sampler, MIX, accum)
        seen[rank] = [{i for i, _ in batch} for batch in batches]
        assert len(seen[rank]) == len(batches) == 6 and all(len(s) == 1 for s in seen[rank])
        # batch b of epoch 1 is micro b % 2 of step 3 + b // 2: the batched path's index for it
        assert [s.pop() for s in seen[rank]] == [MIX.index(3 + b // 2, b % 2) for b in range(6)]
    assert seen[0] == seen[1]
    sampler = ResumableSampler(24, 2, seed=3, rank=1, world_size=2)
    sampler.set_epoch(1, start_batch=4)  # a resume at step 5
    tail = [[i for i, _ in batch] for batch in MixedResolutionBatchSampler(sampler, MIX, accum)]
    assert tail == [[MIX.index(5, 0)] * 2, [MIX.index(5, 1)] * 2]
    assert len(set(MIX.index(s, m) for s in range(3, 6) for m in range(2))) > 1  # the epoch mixes sizes


def test_per_image_views_are_made_at_the_drawn_sizes():
    images = torch.randint(0, 256, (12, 1, 20, 20), dtype=torch.uint8)
    sampler = ResumableSampler(12, 2, seed=3)
    loader = per_image_loader(MIX, sampler, 1, images)
    recipes = MIX.recipes(RECIPE)
    for b, (views, _, keys) in enumerate(loader):
        g, loc, gram = MIX.triple(b)
        assert [tuple(v.shape[-2:]) for v in views] == [(g, g)] * 2 + [(loc, loc)] * 2 + [(gram, gram)] * 2
        transform = MultiCropTransform(recipe=recipes[MIX.index(b)])
        plain = SeededTransform(TensorDataset(images, torch.zeros(12)), transform, seed=3)
        expected = [torch.stack(t) for t in zip(*[plain[int(k)][0] for k in keys])]
        assert all(torch.equal(v, e) for v, e in zip(views, expected))  # crops made at the size, not resized


def test_batched_views_are_made_at_the_drawn_sizes():
    images = torch.randint(0, 256, (3, 1, 20, 20), dtype=torch.uint8)
    crops = MixedResolutionCrops(MIX, RECIPE)
    seeds = sample_seeds(3, torch.arange(3))
    sizes = set()
    for step in range(12):
        g, loc, gram = MIX.triple(step, 1)
        views = crops(images, step=step, micro=1, seeds=seeds)
        assert [tuple(v.shape) for v in views] == [(3, 1, g, g)] * 2 + [(3, 1, loc, loc)] * 2 + [(3, 1, gram, gram)] * 2
        alone = BatchedMultiCrop(recipe=dataclasses.replace(RECIPE, global_crop_size=g, local_crop_size=loc,
                                                            gram_teacher_scale=gram / g))
        assert all(torch.equal(a, b) for a, b in zip(views, alone(images, seeds=seeds)))
        sizes.add(g)
    assert sizes == {28, 42}
    no_gram = ResolutionMix([28, 42], [14, 21], [1, 1])  # the recipe's own Gram scale, or none
    assert [r.gram_teacher_scale for r in no_gram.recipes(RECIPE)] == [None, None]
    scaled = no_gram.recipes(dataclasses.replace(RECIPE, gram_teacher_scale=2.0))
    assert [r.gram_crop_size for r in scaled] == [(56, 56), (84, 84)]


@pytest.mark.parametrize("make", [
    lambda: vit_tiny(patch_size=7, depth=1, embed_dim=24, num_heads=2, img_size=28, in_chans=1),
    lambda: dinov2_vit_small(patch_size=7, depth=1, embed_dim=24, num_heads=2, img_size=28, in_chans=1),
], ids=["vit_tiny", "dinov2_vit_small"])
def test_a_tiny_vit_trains_at_two_sizes(make):
    torch.manual_seed(0)
    dino = DINO(make(), out_dim=16, hidden_dim=16, bottleneck_dim=8, input_size=(1, 28, 28))
    optimizer = torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)
    mix = ResolutionMix([28, 42], [14, 21], [1, 1])
    crops = MixedResolutionCrops(mix, RECIPE)
    images = torch.randint(0, 256, (2, 1, 48, 48), dtype=torch.uint8)
    step_of = {mix.index(s): s for s in range(20)}  # a step at each size
    for size, step in sorted(((mix.triples[i].global_size, s) for i, s in step_of.items())):
        views = crops(images, step=step, generator=torch.Generator().manual_seed(step))
        assert views[0].shape[-1] == size
        before = dino.backbone.patch_embed.proj.weight.detach().clone()
        loss = dino(views)
        optimizer.zero_grad()
        loss.backward()
        dino.optimizer_step(optimizer)
        dino.update_teacher()
        assert torch.isfinite(loss) and not torch.equal(before, dino.backbone.patch_embed.proj.weight)
    assert dino.step == 2


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(local_sizes=[14]), ValueError, "local_sizes=[14] has 1 entries, expected 2"),
    (dict(ratios=[1, 1, 1]), ValueError, "ratios=[1, 1, 1] has 3 entries, expected 2"),
    (dict(gram_sizes=[56]), ValueError, "gram_sizes=[56] has 1 entries, expected 2"),
    (dict(ratios=[0, 0]), ValueError, "ratios=[0.0, 0.0], expected numbers >= 0 with a sum > 0"),
    (dict(ratios=[1, -0.5]), ValueError, "ratios=[1, -0.5], expected finite numbers >= 0 (got -0.5)"),
    (dict(ratios=[1, "a"]), TypeError, "expected finite numbers >= 0 (got 'a')"),
    (dict(global_sizes=[28, 0]), ValueError, "global_sizes=[28, 0], expected ints >= 1 (got 0)"),
    (dict(local_sizes=[14, 2.5]), ValueError, "local_sizes=[14, 2.5], expected ints >= 1 (got 2.5)"),
    (dict(global_sizes=[]), TypeError, "global_sizes=[], expected a non-empty sequence of ints >= 1"),
    (dict(seed=1.5), TypeError, "seed=1.5, expected an int"),
])
def test_mix_errors_name_the_argument(kwargs, error, message):
    with pytest.raises(error) as info:
        ResolutionMix(**{"global_sizes": [28, 42], "local_sizes": [14, 21], "ratios": [1, 1], **kwargs})
    assert message in str(info.value) and "\n" not in str(info.value)


BASE = ["--dataset", "fashion_mnist", "--arch", "vit_tiny", "--patch_size", "7", "--vit_depth", "1",
        "--vit_embed_dim", "24", "--out_dim", "32", "--hidden_dim", "16", "--bottleneck_dim", "8",
        "--batch_size_per_gpu", "4", "--local_crops_number", "2", "--num_workers", "0", "--no_final_knn",
        "--knn_every", "0", "--no_progress", "--attention_maps", "0", "--device", "cpu", "--drop_path_rate", "0"]




@pytest.mark.parametrize("flags, message", [
    (["--global_crop_sizes", "28", "42", "--local_crop_sizes", "14"],
     "--local_crop_sizes 14: 1 values, expected 2, one per --global_crop_sizes 28 42"),
    (["--global_crop_sizes", "28", "40"], "--global_crop_sizes 28 40: 40 is not a multiple of --patch_size 7"),
    (["--global_crop_sizes", "28", "42", "--local_crop_sizes", "14", "15"],
     "--local_crop_sizes 14 15: 15 is not a multiple of --patch_size 7"),
    (["--global_crop_sizes", "28", "42", "--crop_size_ratios", "0", "0"],
     "--crop_size_ratios 0.0 0.0: expected a sum > 0"),
    (["--global_crop_sizes", "28", "--crop_size_ratios", "-1"],
     "--crop_size_ratios -1.0: expected a finite number >= 0"),
    (["--local_crop_sizes", "14"], "--local_crop_sizes 14: a high-resolution stage option, and the stage is off"),
    (["--global_crop_sizes", "28", "--gram_teacher_crop_sizes", "56"],
     "--gram_teacher_crop_sizes 56: the Gram teacher's crops, and Gram anchoring is off"),
    (["--final_momentum_teacher", "1.5"], "--final_momentum_teacher 1.5: expected"),
])
def test_stage_flag_errors_are_one_line(flags, message, tmp_path, capsys):
    err = one_line_error([*BASE, "--max_steps", "1", "--output_dir", str(tmp_path), *flags], capsys)
    assert message in err, err


def test_gram_stage_flag_errors(tmp_path, capsys):
    gram = [*BASE, "--max_steps", "1", "--output_dir", str(tmp_path), "--arch", "dinov2_vit_small", "--gram_weight",
            "1.5", "--global_crop_sizes", "28", "42", "--local_crop_sizes", "14", "21"]
    err = one_line_error([*gram, "--gram_teacher_crop_sizes", "56", "64"], capsys)
    assert "--gram_teacher_crop_sizes 56 64: 64 is not a multiple of --patch_size 7" in err
    err = one_line_error([*gram, "--gram_teacher_crop_sizes", "56", "63", "--gram_teacher_scale", "2"], capsys)
    assert "--gram_teacher_scale 2.0 with --gram_teacher_crop_sizes 56 63: expected one or the other" in err
    err = one_line_error([*gram, "--gram_teacher_scale", "1.6"], capsys)
    assert "--gram_teacher_scale 1.6 with --global_crop_sizes 28 42 (Gram crops 45 67): 45 is not a multiple" in err


class Killed(BaseException):
    """Raised right after a chosen step's checkpoint is on disk, as a kill would stop the run."""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished dino-train run's checkpoint, the stage's starting point."""
    out = tmp_path_factory.mktemp("first")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "write_pictures", lambda *args, **kwargs: None)  # matplotlib: 1 s a run
        assert train.main([*BASE, "--max_steps", "1", "--output_dir", str(out)]) == 0
    return out / "checkpoint.pth"


@pytest.mark.parametrize("augment", ["per_image", "batched"])
def test_a_resume_inside_the_stage_is_bit_identical(augment, finished_run, tmp_path, monkeypatch):
    weights = finished_run
    stage = [*BASE, "--augment", augment, "--max_steps", "3", "--save_every_steps", "1", "--save_every_min", "0",
             "--pretrained_weights", str(weights), "--global_crop_sizes", "28", "42", "--local_crop_sizes", "14", "21",
             "--crop_size_ratios", "0.5", "0.5", "--teacher_temp", "0.07", "--warmup_teacher_temp", "0.07",
             "--momentum_teacher", "0.999", "--final_momentum_teacher", "0.999", "--log_every", "1"]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(train, "write_pictures", lambda *args, **kwargs: None)
    assert train.main([*stage, "--output_dir", str(tmp_path / "straight")]) == 0
    save = checkpointing.save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        if state.get("step") == 1:
            raise Killed

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_stop)
    with pytest.raises(Killed):
        train.main([*stage, "--output_dir", str(tmp_path / "resumed")])
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    monkeypatch.setattr(checkpointing, "save_checkpoint", save)
    assert train.main([*stage, "--output_dir", str(tmp_path / "resumed")]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", map_location="cpu", weights_only=True)
            for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 3
    for key in ("student", "teacher"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    records = [line for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert all('"momentum": 0.999' in r and '"teacher_temp": 0.07' in r for r in records), records
    assert [ResolutionMix([28, 42], [14, 21], [0.5, 0.5]).index(s) for s in range(3)] == [0, 1, 0]  # --seed 0


def test_a_changed_final_momentum_is_a_schedule_change():
    import argparse

    saved = {"final_momentum_teacher": 1.0}
    change = checkpointing.schedule_change(saved, argparse.Namespace(final_momentum_teacher=0.999), None, 10)
    assert change == "--final_momentum_teacher is 0.999 here but 1.0 in the checkpoint's run"
    assert checkpointing.schedule_change({}, argparse.Namespace(final_momentum_teacher=0.999), None, 10) is None


def test_the_docs_snippet_runs(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "dinov3.md").read_text(encoding="utf-8")
    code = text.split("## A high-resolution stage")[1].split("```python\n")[1].split("```")[0]
    exec(compile(code, "docs/dinov3.md", "exec"), {})
    mix = ResolutionMix([28, 40, 40], [16, 16, 24], [0.3, 0.6, 0.1], gram_sizes=[44, 60, 60])
    expected = []
    for step in range(3):
        g, loc, gram = mix.triple(step)
        expected.append(f"{step} {(g, loc, gram)} {[g, g, loc, loc, gram, gram]}")
    assert capsys.readouterr().out.splitlines() == expected
