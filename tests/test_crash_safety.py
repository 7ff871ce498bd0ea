"""dino-train's crash safety: SIGTERM / SIGINT stop and save, random kills resume bit-identically,
stale temporary files go, a full disk and a NaN checkpoint end in one line, schedules stay fixed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dino_pytorch.cli.run_control import EXIT_CODES
from dino_pytorch.cli.train import model_seed
from dino_pytorch.cli.train_checkpoint import first_non_finite, schedule_change
from dino_pytorch.cli.train_flags import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--dataset", "fashion_mnist", "--arch", "convnet", "--width", "8", "--out_dim", "256",
    "--hidden_dim", "64", "--bottleneck_dim", "32", "--batch_size_per_gpu", "16", "--local_crops_number", "2",
    "--num_workers", "0", "--no_final_knn", "--no_progress", "--log_every", "1", "--warmup_epochs", "0",
    "--freeze_last_layer", "0", "--lr", "0.005",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = (sys.executable, "-m", "dino_pytorch.train")
FAULTS = (sys.executable, str(ROOT / "tests" / "crash_after_save.py"))


def run(args, env=None, program=TRAIN):
    return subprocess.run([*program, *map(str, args)], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_line_error(result, status, *words):
    assert result.returncode == status, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bitwise_equal(a, b):
    assert a["step"] == b["step"]
    for key in ("student", "teacher", "dino_loss"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for entry in sa[i]:
            assert torch.equal(sa[i][entry], sb[i][entry]), f"optimizer.state[{i}].{entry} differs"


def sigint_as_python_sets_it():
    """A suite started in the background (`make test &`) would hand its runs SIGINT ignored, which
    dino-train rightly leaves alone: give each run the default, as a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_after_steps(args, sig, steps, to_group=False):
    """Start a run, send ``sig`` (to its whole process group: DataLoader workers too, as Slurm and a
    terminal do) once it has logged ``steps`` steps; (exit status, output)."""
    proc = subprocess.Popen([*TRAIN, *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=to_group,
                            preexec_fn=sigint_as_python_sets_it)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("{") and json.loads(line).get("step", 0) >= steps:
            os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
            break
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + output


# ---------------------------------------------------------------------------------- signals

@pytest.mark.slow
def test_sigterm_saves_at_the_end_of_the_step_exits_143_and_the_resume_is_bitwise(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = SMALL + ["--max_steps", "60"]
    ok(run(flags + ["--output_dir", straight]))
    status, output = signal_after_steps(flags + ["--output_dir", stopped], signal.SIGTERM, 3)
    assert status == EXIT_CODES[signal.SIGTERM] == 143, output[-2000:]
    assert "SIGTERM received" in output and "exit status 143" in output
    step = load(stopped / "checkpoint.pth")["step"]
    assert 3 <= step < 60  # saved at the end of the step in flight, not at an epoch boundary
    assert not list(stopped.glob(".checkpoint*.tmp-*"))
    resumed = ok(run(flags + ["--output_dir", stopped]))
    assert f"resumed from {stopped / 'checkpoint.pth'} at step {step}" in resumed.stdout
    assert_bitwise_equal(load(straight / "checkpoint.pth"), load(stopped / "checkpoint.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_to_the_process_group_with_dataloader_workers_saves_and_exits(tmp_path, sig):
    flags = SMALL + ["--max_steps", "60", "--augment", "per_image", "--num_workers", "2", "--output_dir", tmp_path]
    status, output = signal_after_steps(flags, sig, 2, to_group=True)
    assert status == EXIT_CODES[sig] == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], output[-2000:]
    assert f"{sig.name} received" in output and "Traceback" not in output and "DataLoader worker" not in output
    assert 2 <= load(tmp_path / "checkpoint.pth")["step"] < 60


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env.get(b"RANK", b"-1"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the torchrun workers in /proc (Linux)")
def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "-m", "dino_pytorch.train")
    proc = subprocess.Popen([*launcher, *SMALL, "--batch_size_per_gpu", "8", "--max_steps", "200",
                             "--output_dir", str(tmp_path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=sigint_as_python_sets_it)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("step", 0) >= 2:
            break
    workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 must learn it through the all-reduce
    output, _ = proc.communicate(timeout=300)
    step = load(tmp_path / "checkpoint.pth")["step"]
    assert step % 10 == 0 and 2 < step < 200, output[-2000:]  # STOP_POLL_STEPS = 10
    assert f"stopped at step {step}/200: SIGTERM received" in output, output[-2000:]
    assert "exitcode  : 143" in output or "exit status 143" in output, output[-2000:]


# ------------------------------------------------------------------------- kills and leftovers

@pytest.mark.slow
@pytest.mark.parametrize("arch,augment", [("convnet", "batched"), ("vit_tiny", "per_image")])
def test_two_random_kills_resume_bitwise(arch, augment):
    # The soak script's 2-kill version (benchmarks/soak_resume.py runs N = 10); vit_tiny has drop path 0.1.
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak_resume.py"), "--arch", arch,
                             "--augment", augment, "--kills", "2", "--steps", "16", "--vit_depth", "2"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["identical"] and report["kills"] >= 1, report


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_save_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    flags = SMALL + ["--max_steps", "6", "--save_every_steps", "2", "--output_dir", tmp_path]
    killed = run(flags, env={"KILL_IN_SAVE_AT_STEP": "4"}, program=FAULTS)
    assert killed.returncode == 17
    stale = list(tmp_path.glob(".checkpoint.pth.tmp-*"))
    assert len(stale) == 1 and load(tmp_path / "checkpoint.pth")["step"] == 2
    result = ok(run(flags))
    assert f"removed 1 temporary file(s) of interrupted saves: {stale[0].name}" in result.stdout
    assert not list(tmp_path.glob(".checkpoint*.tmp-*")) and load(tmp_path / "checkpoint.pth")["step"] == 6


@pytest.mark.slow
def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    result = run(SMALL + ["--max_steps", "8", "--save_every_steps", "2", "--output_dir", tmp_path],
                 env={"DISK_FULL_AT_STEP": "4"}, program=FAULTS)
    one_line_error(result, 1, "No space left on device", "step 4", "checkpoint of step 2", "intact")
    assert load(tmp_path / "checkpoint.pth")["step"] == 2
    assert not list(tmp_path.glob(".checkpoint*.tmp-*"))


# ------------------------------------------------------------------------------ refusals

@pytest.mark.slow
def test_a_checkpoint_with_a_nan_weight_is_refused_naming_the_entry(tmp_path):
    ok(run(SMALL + ["--max_steps", "2", "--output_dir", tmp_path]))
    ckpt = load(tmp_path / "checkpoint.pth")
    name = next(n for n, v in ckpt["student"].items() if v.is_floating_point() and v.ndim == 4)
    ckpt["student"][name].view(-1)[3] = float("nan")
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    result = run(SMALL + ["--max_steps", "4", "--output_dir", tmp_path])
    one_line_error(result, 2, "cannot resume", f"student[{name!r}]", "non-finite")


def test_the_non_finite_check_names_nested_entries():
    state = {"state": {0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.tensor([1.0, float("inf")])}},
             "param_groups": [{"lr": 0.1}]}
    assert first_non_finite(state, "optimizer") == "optimizer['state'][0]['exp_avg_sq']"
    assert first_non_finite({"w": torch.ones(2), "n": torch.tensor([1])}, "student") is None


@pytest.mark.slow
def test_a_resume_with_other_schedules_is_refused_unless_allowed(tmp_path):
    ok(run(SMALL + ["--max_steps", "4", "--output_dir", tmp_path]))
    longer = SMALL + ["--max_steps", "6", "--output_dir", tmp_path]
    one_line_error(run(longer), 2, "--max_steps is 6 here but 4", "--allow_schedule_change")
    assert load(tmp_path / "checkpoint.pth")["step"] == 4
    ok(run(longer + ["--allow_schedule_change"]))
    ckpt = load(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 6 and ckpt["total_steps"] == 6


def test_schedule_change_names_the_flag_and_ignores_overridden_ones():
    parse = get_args_parser().parse_args
    saved = vars(parse(["--max_steps", "20", "--epochs", "5", "--lr", "0.001"]))
    assert schedule_change(saved, parse(["--max_steps", "20", "--epochs", "5", "--lr", "0.001"]), 20, 20) is None
    # --epochs does nothing while --max_steps is set in both runs.
    assert schedule_change(saved, parse(["--max_steps", "20", "--epochs", "9", "--lr", "0.001"]), 20, 20) is None
    assert schedule_change(saved, parse(["--max_steps", "20", "--lr", "0.002"]), 20, 20) == (
        "--lr is 0.002 here but 0.001 in the checkpoint's run")
    assert "--max_steps is None here but 20" in schedule_change(saved, parse(["--lr", "0.001", "--epochs", "5"]),
                                                                 20, 500)
    # Same flags, another length (e.g. another world size): named by its steps.
    assert schedule_change(saved, parse(["--max_steps", "20", "--epochs", "5", "--lr", "0.001"]), 20, 10) == (
        "the schedules span 10 steps here but 20 in the checkpoint's run")
    assert schedule_change({}, parse([]), None, 20) is None  # files from before these entries


def test_model_seed_depends_on_the_position_only():
    seeds = {model_seed(0, step, micro, rank) for step in range(50) for micro in range(3) for rank in range(4)}
    assert len(seeds) == 600 and all(0 <= s < 2**63 for s in seeds)
    assert model_seed(1, 2, 0, 0) == model_seed(1, 2, 0, 0) != model_seed(2, 2, 0, 0)


def test_dino_past_total_steps_holds_the_final_momentum():
    # EMATeacher.momentum_at holds the value of the last step past total_steps, as DINOSchedules does.
    from dino_pytorch import DINO

    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dino = DINO(backbone, out_dim=8, embed_dim=4, hidden_dim=8, bottleneck_dim=4, total_steps=3)
    momenta = []
    for _ in range(5):  # a Lightning resume that trains 2 steps past the schedule
        loss = dino([torch.randn(2, 1, 8, 8) for _ in range(2)])
        loss.backward()
        momenta.append(dino.update_teacher())
    assert momenta[2] < 1.0 and momenta[2] == momenta[3] == momenta[4]
    assert dino.teacher.momentum_at(10) == dino.teacher.momentum_at(2)


def test_a_second_signal_acts_at_once():
    from types import SimpleNamespace

    from dino_pytorch.cli.run_control import RunControl

    args = SimpleNamespace(save_every_min=0, time_budget_min=None)
    # A suite started in the background (`make test &`) inherits SIGINT ignored, which RunControl rightly
    # leaves alone: give this test Python's own Ctrl-C handler.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        control = RunControl(args, 1, torch.device("cpu"))  # type: ignore[arg-type]
        try:
            signal.raise_signal(signal.SIGINT)  # to this (the main) thread, whatever other threads there are
            deadline = time.monotonic() + 10  # the handler runs at the next check: wait for it on a busy machine
            while not control.signal and time.monotonic() < deadline:
                time.sleep(0.01)
            assert control.poll(7) and control.exit_code == 130 and control.stop_reason == "SIGINT received"
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the next Ctrl-C acts at once
        finally:
            control.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
