"""dino-visualize-attention on files without a stored configuration (official layouts) and without weights."""
import matplotlib.image  # (matplotlib: the [dev]/[train] extras)
import pytest
import torch

from dino_pytorch import attention as attention_module
from dino_pytorch.attention import save_attention_pngs
from dino_pytorch.cli.visualize_attention import main
from dino_pytorch.models import vit_tiny
from reference_vit import reference_vit


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


def test_cli_with_pretrained_one_channel_weights(tmp_path, png, capsys, monkeypatch):
    # A 1-channel model trained at 32 px: channels and image size come from the weights.
    model = vit_tiny(patch_size=8, img_size=32, in_chans=1)
    with torch.no_grad():  # peaked attention (nearly uniform at init): maps whose values tell pixels apart
        for block in model.blocks:
            block.attn.qkv.weight.mul_(5)
    weights = tmp_path / "backbone.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, weights)
    out = tmp_path / "maps"
    seen = {}

    def spy(output_dir, image, attentions, *args, **kwargs):
        seen.update(image=image.clone(), attentions=attentions.clone())
        return save_attention_pngs(output_dir, image, attentions, *args, **kwargs)

    monkeypatch.setattr(attention_module, "save_attention_pngs", spy)
    main(["--arch", "vit_tiny", "--patch_size", "8", "--pretrained_weights", str(weights), "--image_path", str(png),
          "--image_size", "24", "24", "--threshold", "-1", "--output_dir", str(out), "--device", "cpu"])
    expected = ["img.png", "attn-head0.png", "attn-head1.png", "attn-head2.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    # Values: the maps are the CLS rows of a naive softmax(q k^T / sqrt(d)) of the saved weights' last
    # block on the image fed, and each attn-head PNG is that map, upsampled, min-max scaled, in viridis.
    assert seen["image"].shape == (1, 24, 24)
    ref = reference_vit(model.state_dict(), seen["image"][None], patch_size=8, num_heads=3)["last_attention"]
    ref_maps = ref[0, :, 0, 1:].reshape(3, 3, 3)
    torch.testing.assert_close(seen["attentions"].double(), ref_maps, rtol=1e-4, atol=5e-6)
    for j in range(3):
        big = ref_maps[j].repeat_interleave(8, 0).repeat_interleave(8, 1)
        rgba = matplotlib.colormaps["viridis"](((big - big.min()) / (big.max() - big.min())).numpy())
        png_pixels = matplotlib.image.imread(out / f"attn-head{j}.png")
        assert png_pixels.shape == (24, 24, 4)
        assert abs(png_pixels - rgba).max() <= 2 / 255
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
