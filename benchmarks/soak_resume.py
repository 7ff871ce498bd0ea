"""Soak test of dino-train's crash safety: SIGKILL a run at random moments, resume, compare bits.

One uninterrupted run is the reference. A second run, in its own output_dir and saving after every
step, is killed (SIGKILL: no handler, no clean-up, possibly in the middle of a save) N times at
random wall times while it trains, restarted each time, and finally allowed to finish. Its final
student, teacher, centre, step and every optimizer state entry must equal the reference's bit for
bit, no checkpoint may ever be unreadable, and no temporary file may be left at the end.

    python benchmarks/soak_resume.py --arch convnet --augment batched --kills 10
    python benchmarks/soak_resume.py --arch vit_tiny --augment per_image --kills 10   # drop path 0.1

Prints one JSON line (kills, the steps they hit, identical or the differing entries); exit status 0
when identical, 1 otherwise. Not part of `make test`; tests/test_crash_safety.py runs a 2-kill version.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "fashion_mnist", "--batch_size_per_gpu", "16", "--local_crops_number", "2",
          "--no_final_knn", "--no_progress", "--log_every", "1", "--warmup_epochs", "0", "--freeze_last_layer", "0",
          "--attention_maps", "0", "--saveckp_freq", "0", "--lr", "0.005", "--save_every_min", "0"]
ARCHS = {
    "convnet": ["--arch", "convnet", "--width", "8", "--out_dim", "256", "--hidden_dim", "64",
                "--bottleneck_dim", "32"],
    "vit_tiny": ["--arch", "vit_tiny", "--patch_size", "7", "--drop_path_rate", "0.1", "--out_dim", "256",
                 "--hidden_dim", "64", "--bottleneck_dim", "32"],
}


def flags(args: argparse.Namespace) -> list[str]:
    extra = ["--vit_depth", str(args.vit_depth)] if args.vit_depth and args.arch == "vit_tiny" else []
    workers = "1" if args.augment == "per_image" else "0"  # a worker process too, where it is the official path
    return [*COMMON, *ARCHS[args.arch], *extra, "--augment", args.augment, "--num_workers", workers,
            "--max_steps", str(args.steps), "--save_every_steps", "1"]


def start(cmd_flags: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dino_pytorch.train", *cmd_flags, "--output_dir", str(out)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"soak_resume: a run failed (exit {proc.returncode}):\n{output[-3000:]}")
    return output


def wait_for_training(proc: subprocess.Popen, lines: list[str]) -> bool:
    """Read the run's output until its first step record (it is training); False if it ended first."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('{"step"'):
            return True
    return False


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Entries of two dino-train checkpoints that are not bitwise equal."""
    out = [] if a["step"] == b["step"] else [f"step {a['step']} vs {b['step']}"]
    for key in ("student", "teacher", "dino_loss"):
        out += [f"{key}.{n}" for n in a[key] if n not in b[key] or not torch.equal(a[key][n], b[key][n])]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    if sa.keys() != sb.keys():
        out.append("optimizer.state keys")
    for i in sa.keys() & sb.keys():
        out += [f"optimizer.state[{i}].{k}" for k in sa[i] if k not in sb[i] or not torch.equal(sa[i][k], sb[i][k])]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in a["optimizer"]["param_groups"]]
    if groups != [{k: v for k, v in g.items() if k != "params"} for g in b["optimizer"]["param_groups"]]:
        out.append("optimizer.param_groups")
    return out


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    cmd_flags = flags(args)
    reference, killed = work / "reference", work / "killed"
    began = time.time()
    ref_proc = start(cmd_flags, reference)
    wait_for_training(ref_proc, [])
    train_start = train_end = time.time()
    assert ref_proc.stdout is not None
    for line in ref_proc.stdout:  # the reference's training time: first step record to the last
        if line.startswith('{"step"'):
            train_end = time.time()
    finish(ref_proc)
    train_s = train_end - train_start
    kill_steps: list[Any] = []
    temp_files_seen = 0
    while len(kill_steps) < args.kills:
        proc = start(cmd_flags, killed)
        if not wait_for_training(proc, []):
            proc.wait()
            break  # the run had finished: no more to kill
        # Spread the kills over the run: each at a random moment of the next 1.5/(N+1) of its training.
        time.sleep(rng.uniform(0.0, 1.5 * train_s / (args.kills + 1)))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        temp_files_seen += len(list(killed.glob(".checkpoint*.tmp-*")))
        ckpt = killed / "checkpoint.pth"
        # Every checkpoint on disk must load: the save is atomic.
        kill_steps.append(torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None)
    finish(start(cmd_flags, killed))
    leftovers = sorted(p.name for p in killed.glob(".checkpoint*.tmp-*"))
    a = torch.load(reference / "checkpoint.pth", weights_only=True)
    b = torch.load(killed / "checkpoint.pth", weights_only=True)
    diff = differences(a, b) + [f"left over: {name}" for name in leftovers]
    return {"arch": args.arch, "augment": args.augment, "steps": args.steps, "kills": len(kill_steps),
            "checkpoint_step_after_each_kill": kill_steps, "kills_that_left_a_temp_file": temp_files_seen,
            "identical": not diff, "differences": diff[:20], "seconds": round(time.time() - began, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="convnet", choices=sorted(ARCHS))
    p.add_argument("--augment", default="batched", choices=["batched", "per_image"])
    p.add_argument("--kills", default=10, type=int)
    p.add_argument("--steps", default=60, type=int)
    p.add_argument("--vit_depth", default=None, type=int, help="vit_tiny blocks (default: its 12)")
    p.add_argument("--seed", default=0, type=int, help="seed of the kill times")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = p.parse_args()
    if args.workdir:
        result = soak(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory() as work:
            result = soak(args, Path(work))
    print(json.dumps(result), flush=True)
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
