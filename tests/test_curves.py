import json

import matplotlib.image  # (matplotlib: the [dev]/[train] extras)
import pytest

from dino_pytorch.curves import plot_curves


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
