import json
import math

import matplotlib.image  # (matplotlib: the [dev]/[train] extras)
import pytest

from dino_pytorch.curves import curves_figure, plot_curves


def test_plot_curves_from_log_file(tmp_path):
    log = tmp_path / "log.txt"
    lines = [{"step": 10 * i, "epoch": i // 5, "train_loss": 8.0 - 0.1 * i} for i in range(20)]
    lines[9]["knn_top1"] = 40.0
    lines[19]["knn_top1"] = 55.0
    lines.append({"epoch": 4, "train_lr": 1e-3})  # keys may be missing
    log.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 200, "train_lo')  # being written
    with pytest.warns(UserWarning, match="incomplete last line"):
        out = plot_curves(log, tmp_path / "plots" / "curves.png")
    assert out.exists() and out.stat().st_size > 0
    assert matplotlib.image.imread(out).shape[1] > matplotlib.image.imread(out).shape[0]  # two panels


def test_plot_curves_from_records_and_errors(tmp_path):
    out = plot_curves([{"epoch": e, "train_loss": 5.0 / (e + 1)} for e in range(5)], tmp_path / "loss.png")
    assert out.stat().st_size > 0
    with pytest.raises(ValueError, match="no train_loss"):
        plot_curves([{"epoch": 1}], tmp_path / "x.png")
    bad = tmp_path / "bad.txt"
    bad.write_text('{"train_loss": 1}\nnot json\n{"train_loss": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        plot_curves(bad, tmp_path / "x.png")


def monitor_log(k=64, collapse_at=None):
    """Step records as dino-train writes them (the collapse monitor's numbers included)."""
    ln_k = math.log(k)
    records = []
    for i in range(1, 11):
        mean_h = ln_k - 0.3 * i
        record = {"step": 10 * i, "epoch": 0, "train_loss": 0.95 * ln_k, "teacher_entropy": ln_k - 0.4 * i,
                  "teacher_mean_entropy": mean_h, "teacher_kl_uniform": ln_k - mean_h,
                  "prototypes_used": float(k - 5 * i), "student_teacher_kl": 0.1 * i,
                  "loss_over_ln_k": 0.95}
        if 10 * i == collapse_at:
            record["collapse"] = f"one-hot collapse at step {collapse_at}: ... | uniform collapse at step ..."
        records.append(record)
    return records + [{"step": 100, "knn_top1": 61.0, "final": True}]


def dashed_levels(ax):
    return sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--")


def test_monitor_panels_show_entropy_against_ln_k_and_mark_the_collapse(tmp_path):
    fig = curves_figure(monitor_log(k=64, collapse_at=70))
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["DINO loss", "k-NN", "collapse monitor: teacher entropy",
                          "collapse monitor: prototypes used"]
    entropy, prototypes = axes["collapse monitor: teacher entropy"], axes["collapse monitor: prototypes used"]
    # ln K recovered from the records; thresholds of CollapseThresholds: 0.9 ln K and ln 4.
    assert dashed_levels(entropy) == pytest.approx([math.log(4), 0.9 * math.log(64), math.log(64)], rel=1e-6)
    assert dashed_levels(prototypes) == [2]
    solid = [line for line in entropy.lines if line.get_linestyle() == "-"]
    # Three curves and one vertical collapse line at step 70 (x constant, spanning the axes).
    curves = [line for line in solid if len(line.get_xdata()) == 10]
    assert [list(line.get_ydata()) for line in curves[:2]] == [
        [r["teacher_entropy"] for r in monitor_log()[:10]], [r["teacher_mean_entropy"] for r in monitor_log()[:10]]]
    for ax in (entropy, prototypes):
        marks = [line for line in ax.lines if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]
        assert [line.get_xdata()[0] for line in marks] == [70]
        assert any("one-hot collapse + uniform collapse" in t.get_text() for t in ax.texts)
    out = plot_curves(monitor_log(), tmp_path / "curves.png")
    assert matplotlib.image.imread(out).shape[:2] == (800, 1200)  # 2 x 2 panels of 6 x 4 inches


def test_old_log_without_monitor_keys_keeps_two_panels(tmp_path):
    old = [{k: v for k, v in r.items() if k in ("step", "epoch", "train_loss", "knn_top1")} for r in monitor_log()]
    assert [ax.get_title() for ax in curves_figure(old).axes] == ["DINO loss", "k-NN"]
    assert matplotlib.image.imread(plot_curves(old, tmp_path / "old.png")).shape[:2] == (400, 1200)
    # Entropies without prototypes_used or ln K: one monitor panel, only the ln 4 line.
    partial = [{"step": r["step"], "train_loss": r["train_loss"], "teacher_entropy": r["teacher_entropy"]}
               for r in monitor_log()[:10]]
    fig = curves_figure(partial)
    assert [ax.get_title() for ax in fig.axes] == ["DINO loss", "collapse monitor: teacher entropy"]
    assert dashed_levels(fig.axes[1]) == pytest.approx([math.log(4)])


def test_the_loss_parts_are_lines_of_the_loss_panel_when_ibot_or_koleo_is_on():
    parts = [{"step": 10 * i, "train_loss": 9.0 - 0.1 * i, "dino_loss": 6.0 - 0.1 * i, "ibot_loss": 3.0 - 0.05 * i,
              "koleo_loss": 0.5} for i in range(1, 6)]
    ax = curves_figure(parts).axes[0]
    assert ax.get_title() == "loss and its parts (unweighted)"
    assert [line.get_label() for line in ax.lines] == ["total (train_loss)", "DINO", "iBOT (masked patches)", "KoLeo"]
    assert list(ax.lines[2].get_ydata()) == [r["ibot_loss"] for r in parts]
    # DINO alone (a v1 run logs its dino_loss too): the part is the loss, one line as before.
    v1 = [{k: r[k] for k in ("step", "train_loss", "dino_loss")} for r in parts]
    ax = curves_figure(v1).axes[0]
    assert ax.get_title() == "DINO loss" and len(ax.lines) == 1
