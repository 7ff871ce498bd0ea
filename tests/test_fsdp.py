"""FSDP2 on two gloo ranks: one shared set of short runs, every assertion of issue 21 on it.

A tiny ViT (no drop path, no BatchNorm) trains 11 SGD steps (momentum 0.9, weight decay in its
group, per-parameter clipping that bites, the last layer frozen for the first 2 steps) on the same
global batches:

- one process of 2B images (in this process), which also saves a sharded checkpoint at step 6;
- in two spawned ranks of B images (rank r holds images r, r + 2, ..., as the sampler deals them):
  the same run under FSDP (saving its own checkpoint at step 6) and under DDP; FSDP with activation
  checkpointing for one step; FSDP resumed from its own checkpoint and from the 1-process one;
- then, here again, one process resumed from the 2-rank checkpoint, and its export.

The layouts differ only in the order of float sums (~1e-7 a step), so student, teacher and centre
agree to 1e-5 while the weights move by more than 100x that.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_pytorch import DINO
from dino_pytorch.activation_checkpointing import checkpoint_blocks
from dino_pytorch.cli import export
from dino_pytorch.cli import train as train_program
from dino_pytorch.export import export_official
from dino_pytorch.fsdp import local_bytes
from dino_pytorch.models import vit_tiny
from dino_pytorch.safe_load import CheckpointError
from dino_pytorch.sharded_checkpoint import FORMAT, load_sharded_checkpoint, read_meta, save_sharded_checkpoint
from reference_vit import reference_vit
from test_distributed_equality import free_port
from train_cases import TINY_VIT_SGD, run

B, WORLD, STEPS, SAVE_AT = 4, 2, 11, 6  # the resumed runs take STEPS - SAVE_AT = 5 more steps
LR, CLIP, FREEZE = 0.1, 3.0, 2  # CLIP: the official default, which bites about 2 in 3 gradients here
# Weight decay in the decayed group only (param_groups: biases and 1-D not): a parameter in the wrong
# group under FSDP would move by ~LR * WD * |p| a step more or less, far above the tolerance.
WD = 0.2
TOLERANCE = 1e-5
SPAWN_SECONDS = 60  # the two ranks' share of the slow suite's budget (~18 s alone on the 2 cores here)


def tiny_dino() -> DINO:
    torch.manual_seed(0)  # the same initial weights in every process
    backbone = vit_tiny(patch_size=7, img_size=28, in_chans=1, embed_dim=48, depth=2, num_heads=3)
    return DINO(backbone, out_dim=64, hidden_dim=32, bottleneck_dim=16, input_size=(1, 28, 28), momentum_teacher=0.9)


def global_views(step: int) -> list[torch.Tensor]:
    """The step's views of all WORLD * B images: two global crops of 28 px, two local ones of 14 px."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(WORLD * B, 1, 28, 28, generator=g) for _ in range(2)] + [
        torch.randn(WORLD * B, 1, 14, 14, generator=g) for _ in range(2)]


def whole(state: dict) -> dict:
    """A state dict with every DTensor gathered (all ranks call it), detached clones."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def whole_grads(dino: DINO) -> dict:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in dino.student.named_parameters() if p.grad is not None}


def profiled(fn):
    """``(fn(), the collectives the profiler saw while it ran)``: c10d / gloo events, at any depth."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, [e.name for e in prof.events() if "c10d" in e.name or e.name.startswith("gloo")]


def count_teacher_updates(dino: DINO, record: dict) -> None:
    """Profile every ``dino.teacher.update`` (the EMA alone; ``update_teacher`` also all-reduces the centre)."""
    update = dino.teacher.update

    def counted(*args, **kwargs):
        momentum, events = profiled(lambda: update(*args, **kwargs))
        record.setdefault("update_collectives", []).append(events)
        return momentum

    dino.teacher.update = counted


def setup(strategy: str | None, rank: int, world: int, checkpointing: bool = False):
    dino = tiny_dino()
    if checkpointing:
        checkpoint_blocks(dino.backbone)
    if strategy is not None:
        dino.distribute(strategy=strategy)
    optimizer = torch.optim.SGD(dino.param_groups(), lr=LR, momentum=0.9, weight_decay=WD)
    return dino, optimizer


def train(dino, optimizer, rank: int, world: int, start: int, stop: int, save: Path | None = None,
          record: dict | None = None) -> list[float]:
    """Steps ``start`` to ``stop`` on this rank's images; this rank's loss of every step. ``record``
    gets step ``start``'s gradients before and after the clip, the clip's norms and collectives, the
    collectives of the first forward and of every teacher update, and the last layer while frozen."""
    losses = []
    if record is not None:
        count_teacher_updates(dino, record)
    for step in range(start, stop):
        if save is not None and step == SAVE_AT:
            save_sharded_checkpoint(save, dino, optimizer, epoch=0, args={"lr": LR, "batch_size_per_gpu": B})
        views = [v[rank::world] for v in global_views(step)]
        optimizer.zero_grad(set_to_none=True)
        first = record is not None and step == start
        if first:
            loss, record["forward_collectives"] = profiled(lambda views=views: dino(views))
        else:
            loss = dino(views)
        loss.backward()
        if first:
            record["grads"] = whole_grads(dino)
            norms, record["clip_collectives"] = profiled(lambda: dino.clip_gradients_(CLIP))
            record["norms"], record["clipped"] = [n.clone() for n in norms], whole_grads(dino)
        else:
            dino.clip_gradients_(CLIP)
        if step < FREEZE:
            dino.cancel_last_layer_gradients_()
        dino.optimizer_step(optimizer)
        dino.update_teacher()
        if record is not None and step == FREEZE - 1:
            record["frozen_last_layer"] = whole(dino.student.head.last_layer.state_dict())
        losses.append(loss.item())
    return losses


def final_state(dino: DINO) -> dict:
    return {"student": whole(dino.student.state_dict()), "teacher": whole(dino.teacher.module.state_dict()),
            "center": dino.criterion.center.clone()}


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out, results = Path(out_dir), {}
    try:
        dino, optimizer = setup("fsdp", rank, WORLD)
        record: dict = {}
        results["fsdp_losses"] = train(dino, optimizer, rank, WORLD, 0, STEPS, save=out / "two", record=record)
        results["fsdp"], results["record"] = final_state(dino), record
        results["bytes"] = local_bytes(dino, optimizer)  # after the last step: gradients and state present
        dino, optimizer = setup("ddp", rank, WORLD)
        train(dino, optimizer, rank, WORLD, 0, STEPS)
        results["ddp"] = final_state(dino)
        dino, optimizer = setup("fsdp", rank, WORLD, checkpointing=True)
        dino([v[rank::WORLD] for v in global_views(0)]).backward()
        results["checkpointed_grads"] = whole_grads(dino)
        dino, optimizer = setup("fsdp", rank, WORLD)  # the same step as 2 micro-batches of B / 2
        views = [v[rank::WORLD] for v in global_views(0)]
        for micro, half in enumerate((slice(0, B // 2), slice(B // 2, B))):
            with dino.no_sync(micro == 0):  # no reduce-scatter before the last micro-batch
                (dino([v[half] for v in views]) / 2).backward()
        results["accumulated_grads"] = whole_grads(dino)
        for name, source in (("resumed", out / "two"), ("from_one", out / "one")):
            dino, optimizer = setup("fsdp", rank, WORLD)
            load_sharded_checkpoint(source, dino, optimizer)
            results[f"{name}_losses"] = train(dino, optimizer, rank, WORLD, SAVE_AT, STEPS)
            results[name] = final_state(dino)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def one_process(out: Path) -> dict:
    dino, optimizer = setup(None, 0, 1)
    losses = train(dino, optimizer, 0, 1, 0, STEPS, save=out / "one")
    return {"losses": losses, **final_state(dino), "bytes": local_bytes(dino, optimizer)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    torch.set_num_threads(1)
    one = one_process(out)
    start = time.time()
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    seconds = time.time() - start
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    dino, optimizer = setup(None, 0, 1)
    load_sharded_checkpoint(out / "two", dino, optimizer)  # 2 ranks -> 1 process
    one_from_two = {"losses": train(dino, optimizer, 0, 1, SAVE_AT, STEPS), **final_state(dino)}
    return {"one": one, "ranks": ranks, "one_from_two": one_from_two, "out": out, "seconds": seconds}


def assert_same(a: dict, b: dict, what: str, tolerance: float = TOLERANCE) -> None:
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=tolerance, msg=f"{what}: {key}.{name}")
    torch.testing.assert_close(b["center"], a["center"], rtol=0, atol=tolerance, msg=f"{what}: centre")


@pytest.mark.slow
def test_fsdp_with_batch_b_equals_one_process_with_2b_and_ddp(runs):
    one, ranks = runs["one"], runs["ranks"]
    assert runs["seconds"] < SPAWN_SECONDS, f"the two ranks took {runs['seconds']:.0f}s"
    initial = tiny_dino().student.state_dict()
    movement = max((one["student"][n] - initial[n]).abs().max().item() for n in initial)
    assert movement > 100 * TOLERANCE, f"the student barely moved ({movement:.2e}): the comparison would be empty"
    assert torch.count_nonzero(one["center"])
    for rank in ranks:  # every rank gathers the same whole weights
        assert_same(one, rank["fsdp"], "FSDP vs one process of 2B")
        assert_same(rank["ddp"], rank["fsdp"], "FSDP vs DDP")
    for step in range(STEPS):  # each rank's loss is the mean over its B images: their mean is the loss of 2B
        mean = sum(rank["fsdp_losses"][step] for rank in ranks) / WORLD
        assert mean == pytest.approx(one["losses"][step], rel=1e-6, abs=1e-6), step


@pytest.mark.slow
def test_teacher_update_issues_no_collective(runs):
    for rank in runs["ranks"]:
        record = rank["record"]
        assert record["forward_collectives"], "the profiler saw no all-gather in an FSDP forward: the count is blind"
        assert len(record["update_collectives"]) == STEPS
        assert all(events == [] for events in record["update_collectives"]), record["update_collectives"]


@pytest.mark.slow
def test_clipping_and_freezing_on_shards_equal_the_unsharded_reference(runs):
    initial = tiny_dino().student.head.last_layer.state_dict()
    for rank in runs["ranks"]:
        record = rank["record"]
        # One all-reduce for all the per-parameter norms (gloo shows the c10d op and its own event).
        assert sum("allreduce" in name for name in record["clip_collectives"] if name.startswith("c10d")) == 1
        grads, clipped = record["grads"], record["clipped"]
        norms = dict(zip(grads, record["norms"]))
        assert grads.keys() == clipped.keys() and len(norms) == len(grads)
        bit = 0
        for name, grad in grads.items():
            norm = grad.double().norm()  # the official per-parameter clip, float64, on the whole gradient
            expected = grad.double() * min(1.0, CLIP / (norm.item() + 1e-6))
            bit += norm.item() > CLIP
            assert norms[name].item() == pytest.approx(norm.item(), rel=1e-5), name
            torch.testing.assert_close(clipped[name].double(), expected, rtol=1e-5, atol=1e-9, msg=name)
        assert 0 < bit < len(grads), f"the clip bit {bit} of {len(grads)} gradients: expected some, not all"
        for name, value in record["frozen_last_layer"].items():  # no update while frozen
            assert torch.equal(value, initial[name]), name


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_gradients(runs):
    for rank in runs["ranks"]:
        plain, checkpointed = rank["record"]["grads"], rank["checkpointed_grads"]
        assert plain.keys() == checkpointed.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow
def test_gradient_accumulation_under_fsdp_gives_the_gradients_of_the_whole_batch(runs):
    for rank in runs["ranks"]:
        plain, accumulated = rank["record"]["grads"], rank["accumulated_grads"]
        assert plain.keys() == accumulated.keys()
        for name, grad in plain.items():  # two half-batch means, halved and summed: float rounding only
            # (~1e-7 of the largest entry; gradients reach ~1e3 here, and one process differs alike: 5e-8)
            scale = grad.abs().max().item()
            torch.testing.assert_close(accumulated[name], grad, rtol=0, atol=1e-6 * scale, msg=name)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_at_any_world_size(runs):
    one, ranks, one_from_two = runs["one"], runs["ranks"], runs["one_from_two"]
    for rank in ranks:  # 2 ranks -> 2 ranks: bit-identical, next loss included
        for key in ("student", "teacher"):
            for name, value in rank["fsdp"][key].items():
                assert torch.equal(rank["resumed"][key][name], value), f"{key}.{name}"
        assert torch.equal(rank["resumed"]["center"], rank["fsdp"]["center"])
        assert rank["resumed_losses"] == rank["fsdp_losses"][SAVE_AT:]
    two_next = sum(rank["fsdp_losses"][SAVE_AT] for rank in ranks) / WORLD
    assert one_from_two["losses"][0] == pytest.approx(two_next, abs=1e-6)  # 2 ranks -> 1 process
    assert_same(one, one_from_two, "2 ranks -> 1 process, 5 more steps")
    from_one = sum(rank["from_one_losses"][0] for rank in ranks) / WORLD  # 1 process -> 2 ranks
    assert from_one == pytest.approx(one["losses"][SAVE_AT], abs=1e-6)
    for rank in ranks:
        assert_same(one, rank["from_one"], "1 process -> 2 ranks, 5 more steps")


@pytest.mark.slow
def test_per_rank_bytes_of_two_ranks_are_about_half(runs):
    single = runs["one"]["bytes"]  # after the last step, as the ranks' (gradients and state present)
    assert single["parameters"] and single["gradients"] and single["optimizer"]
    for rank in runs["ranks"]:
        for part in ("parameters", "gradients", "optimizer", "total"):
            assert rank["bytes"][part] <= 0.55 * single[part], (part, rank["bytes"][part], single[part])
    assert sum(rank["bytes"]["parameters"] for rank in runs["ranks"]) == single["parameters"]


@pytest.mark.slow
def test_export_of_the_two_rank_checkpoint_loads_into_the_official_vit(runs, tmp_path):
    path = export_official(runs["out"] / "two", tmp_path / "checkpoint.pth")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "dino_loss", "args", "step"} <= checkpoint.keys()
    assert checkpoint["step"] == SAVE_AT and "head.last_layer.weight_g" in checkpoint["teacher"]
    teacher = {k[len("backbone."):]: v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")}
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    ours = tiny_dino()
    ours.load_official_checkpoint(checkpoint)  # our DINO reads it back, heads included
    with torch.no_grad():
        cls = ours.teacher_backbone.eval()(x)
    ref = reference_vit(teacher, x, patch_size=7, num_heads=3)  # the official ViT, float64, from the file
    assert (cls.double() - ref["cls"]).abs().max() <= 1e-5
    optimizer = torch.optim.SGD(ours.param_groups(), lr=LR, momentum=0.9, weight_decay=WD)
    optimizer.load_state_dict(checkpoint["optimizer"])  # torch's own layout: an unsharded run resumes from it
    assert len(optimizer.state) == sum(1 for p in ours.student.parameters() if p.requires_grad)


# ------------------------------------------------------------------ dino-train --fsdp and dino-export

PROGRAM = [*TINY_VIT_SGD, "--vit_depth", "2", "--vit_embed_dim", "48", "--lr", "0.5", "--momentum_teacher", "0.9",
           "--max_steps", "8", "--seed", "3", "--log_every", "8", "--device", "cpu", "--save_every_min", "0"]


def program_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_fsdp_flag_and_export_errors_are_one_line(tmp_path, capsys):
    base = [*PROGRAM, "--output_dir", str(tmp_path / "run")]
    err = program_error(capsys, train_program.main, [*base, "--fsdp", "--fused_head_loss", "true"])
    assert "--fused_head_loss true with --fsdp" in err and "expected --fused_head_loss false" in err
    err = program_error(capsys, train_program.main, [*base, "--fsdp", "--precision", "fp16"])
    assert "--precision fp16 with --fsdp: expected bf16" in err
    err = program_error(capsys, export.main, [str(tmp_path / "none"), str(tmp_path / "out.pth")])
    assert err.startswith("dino-export: error: checkpoint_dir") and "no such directory" in err
    err = program_error(capsys, export.main, [str(tmp_path), str(tmp_path)])
    assert f"out {str(tmp_path)!r} is a directory" in err


@pytest.fixture(scope="module")
def program_runs(tmp_path_factory) -> dict:
    """dino-train: 1 process of 2B (checkpoint.pth), 2 ranks of B under --fsdp (the folder, exported),
    that folder resumed in 1 process of 2B for 2 more steps."""
    out = tmp_path_factory.mktemp("program")
    start = time.time()
    knn = ["--knn_every", "4", "--knn_train_subset", "200", "--knn_test_subset", "100"]  # rank 0 reads the teacher
    run([*PROGRAM, *knn, "--batch_size_per_gpu", str(2 * B), "--output_dir", str(out / "one")])
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    two = run([*PROGRAM, *knn, "--fsdp", "--batch_size_per_gpu", str(B), "--output_dir", str(out / "two")],
              launcher=launcher)
    assert export.main([str(out / "two" / "checkpoint"), str(out / "two.pth")]) == 0
    shutil.copytree(out / "two", out / "resumed")
    resumed = run([*PROGRAM, "--fsdp", "--batch_size_per_gpu", str(2 * B), "--max_steps", "10",
                   "--allow_schedule_change", "--output_dir", str(out / "resumed")])
    return {"out": out, "two": two, "resumed": resumed, "seconds": time.time() - start}


@pytest.mark.slow
def test_dino_train_fsdp_equals_one_process_and_resumes_on_one(program_runs, capsys):
    out = program_runs["out"]
    # ~34 s alone on the 2 cores here; the bound leaves room for the slow step's other xdist worker
    assert program_runs["seconds"] < 100, f"the three dino-train runs took {program_runs['seconds']:.0f}s"
    one, two = torch.load(out / "one" / "checkpoint.pth", weights_only=True), torch.load(out / "two.pth",
                                                                                          weights_only=True)
    assert one["step"] == two["step"] == 8 and two["model_config"] == one["model_config"]
    for key in ("student", "teacher"):  # the program's FSDP run of B per rank = its 1-process run of 2B
        assert one[key].keys() == two[key].keys()
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=0, atol=TOLERANCE, msg=f"{key}.{name}")
    torch.testing.assert_close(two["dino_loss"]["center"], one["dino_loss"]["center"], rtol=0, atol=TOLERANCE)
    knn = [[(r["step"], r["knn_top1_subset"]) for r in map(json.loads, (out / run / "metrics.jsonl").open())
            if "knn_top1_subset" in r] for run in ("one", "two")]  # the sharded teacher gathered for rank 0
    assert [step for step, _ in knn[1]] == [step for step, _ in knn[0]] == [0, 4]
    for (_, sharded), (_, whole) in zip(knn[1], knn[0]):  # weights equal to 1e-5: at most a near tie flips
        assert sharded == pytest.approx(whole, abs=1.0)  # one test image in 100
    assert f"resumed from {out / 'resumed' / 'checkpoint'} at step 8" in program_runs["resumed"].stdout
    meta = read_meta(out / "resumed" / "checkpoint")
    assert meta["step"] == 10 and meta["world_size"] == 1 and meta["args"]["fsdp"]
    # The global batch is the resume's invariant: 1 process of B is refused, in one line.
    err = program_error(capsys, train_program.main, [*PROGRAM, "--fsdp", "--batch_size_per_gpu", str(B),
                                             "--output_dir", str(out / "two")])
    assert "the global batch" in err and f"is {B} here but {2 * B}" in err
    err = program_error(capsys, train_program.main, [*PROGRAM, "--batch_size_per_gpu", str(B), "--output_dir",
                                             str(out / "two")])  # without --fsdp: dino-export named
    assert "pass --fsdp" in err and "dino-export" in err


def test_a_folder_whose_index_names_other_globals_is_refused_unread(tmp_path):
    class Payload:  # unpickling it would call os.system
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "dino.json").write_text(json.dumps({"format": FORMAT, "step": 1, "world_size": 1}))
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="refers to the Python global (posix|os).system"):
        export_official(folder, tmp_path / "out.pth")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out.pth").exists()


def test_activation_checkpointing_without_fsdp_replays_drop_path():
    def grads(checkpointed: bool, seed: int = 1) -> dict:
        torch.manual_seed(0)
        backbone = vit_tiny(patch_size=7, img_size=28, in_chans=1, embed_dim=48, depth=2, num_heads=3,
                            drop_path_rate=0.5)
        dino = DINO(backbone, out_dim=64, hidden_dim=32, bottleneck_dim=16, input_size=(1, 28, 28))
        if checkpointed:
            assert checkpoint_blocks(dino.backbone) == ["blocks.0", "blocks.1"]
            assert checkpoint_blocks(dino.backbone) == ["blocks.0", "blocks.1"]  # again: wrapped once
        torch.manual_seed(seed)  # drop path's draws
        dino(global_views(0)).backward()
        return {n: p.grad for n, p in dino.student.named_parameters() if p.grad is not None}

    plain, checkpointed, other_draws = grads(False), grads(True), grads(False, seed=2)
    assert plain.keys() == checkpointed.keys()
    assert any(not torch.allclose(plain[n], other_draws[n]) for n in plain), "drop path drew nothing"
    for name, grad in plain.items():  # the recomputation replays the RNG: the same draws, the same sums
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-7, msg=name)
