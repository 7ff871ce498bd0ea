"""dino-visualize-attention on files without a stored configuration (official layouts) and without weights."""
import matplotlib.image  # (matplotlib: the [dev]/[train] extras)
import pytest
import torch

from dino_pytorch.cli.visualize_attention import main
from dino_pytorch.models import vit_tiny


@pytest.fixture()
def png(tmp_path):
    y, x = torch.meshgrid(torch.linspace(0, 1, 50), torch.linspace(0, 1, 70), indexing="ij")
    rgb = torch.stack([x, y, (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1], dim=-1).float()
    path = tmp_path / "photo.png"
    matplotlib.image.imsave(path, rgb.numpy())
    return path


def test_cli_random_init_on_an_image(tmp_path, png):
    out = tmp_path / "maps"
    with pytest.warns(UserWarning, match="randomly initialised"):
        code = main(["--arch", "vit_tiny", "--patch_size", "8", "--image_path", str(png), "--image_size", "32", "48",
                     "--output_dir", str(out), "--device", "cpu"])
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    expected = ["img.png"] + [f"attn-head{j}.png" for j in range(3)] + [f"mask_th0.6_head{j}.png" for j in range(3)]
    assert files == sorted(expected)
    assert all((out / f).stat().st_size > 0 for f in files)
    assert matplotlib.image.imread(out / "attn-head0.png").shape[:2] == (32, 48)


def test_cli_with_pretrained_one_channel_weights(tmp_path, png, capsys):
    # A 1-channel model trained at 32 px: channels and image size come from the weights.
    model = vit_tiny(patch_size=8, img_size=32, in_chans=1)
    weights = tmp_path / "backbone.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, weights)
    out = tmp_path / "maps"
    main(["--arch", "vit_tiny", "--patch_size", "8", "--pretrained_weights", str(weights), "--image_path", str(png),
          "--image_size", "24", "24", "--threshold", "-1", "--output_dir", str(out), "--device", "cpu"])
    expected = ["img.png", "attn-head0.png", "attn-head1.png", "attn-head2.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    with pytest.raises(SystemExit) as exit_info:
        main(["--arch", "vit_tiny", "--patch_size", "16", "--pretrained_weights", str(weights),
              "--image_path", str(png)])
    assert exit_info.value.code == 2 and "--patch_size 8" in capsys.readouterr().err


def test_cli_on_fashion_mnist(tmp_path):
    out = tmp_path / "fm"
    with pytest.warns(UserWarning, match="randomly initialised"):
        main(["--arch", "vit_tiny", "--patch_size", "8", "--fashion_mnist_index", "3", "--image_size", "32", "32",
              "--threshold", "0.5", "--output_dir", str(out), "--device", "cpu"])
    assert (out / "img.png").stat().st_size > 0 and (out / "mask_th0.5_head2.png").stat().st_size > 0
