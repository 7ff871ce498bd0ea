"""What the evaluation CLIs share: flags, datasets with the official eval transforms, the backbone."""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "add_backbone_args", "add_data_args", "build_backbone", "build_datasets", "make_loader",
    "model_channels", "resolve_device", "str2bool",
]

_TRUE, _FALSE = ("true", "1", "on", "yes", "t", "y"), ("false", "0", "off", "no", "f", "n")


def str2bool(value: str) -> bool:
    """argparse type for booleans spelled true/false, 1/0, on/off, yes/no (any case)."""
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean, expected one of true/false, 1/0, on/off, yes/no")


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="vit_small", help="name given to dino_pytorch.models.create_model")
    parser.add_argument("--patch_size", type=int, default=16, help="ViT patch size")
    parser.add_argument("--pretrained_weights", default="", help="checkpoint to evaluate (empty: random init)")
    parser.add_argument("--checkpoint_key", default="teacher", help='key of the weights in the checkpoint ("teacher" or "student")')
    parser.add_argument("--trusted_checkpoint", type=str2bool, nargs="?", const=True, default=False,
                        help="allow unpickling (weights_only=False), needed by official full training checkpoints "
                             "(they hold an argparse Namespace); only for files you trust")
    parser.add_argument("--in_chans", type=int, default=None,
                        help="model input channels (default: 1 for fashion_mnist, else 3; grey images are repeated)")
    parser.add_argument("--img_size", type=int, default=None,
                        help="ViT position-table resolution, to match the checkpoint (default: 28 for "
                             "fashion_mnist, else 224; other input sizes are interpolated)")
    parser.add_argument("--batch_size_per_gpu", type=int, default=128, help="batch size of the data loaders")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--num_workers", type=int, default=4, help="data loader workers")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("imagefolder", "fashion_mnist"), default="imagefolder",
                        help="imagefolder: --data_path/{train,val}; fashion_mnist: the idx files")
    parser.add_argument("--data_path", default=None,
                        help="imagefolder: folder with train/ and val/; fashion_mnist: folder of the idx files "
                             "(default: dino_pytorch.datasets.FASHION_MNIST_DIR)")
    parser.add_argument("--subset", type=int, default=None, help="use only the first N train and N test images")


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _imagefolder_transforms(train_augment: bool):
    from torchvision import transforms

    from ..transforms import IMAGENET_MEAN, IMAGENET_STD

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    val = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        *normalize,
    ])
    if not train_augment:
        return val, val
    # The official eval_linear train transform; RandomResizedCrop keeps its bilinear default.
    train = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), *normalize])
    return train, val


class _RepeatChannels:
    """(1, H, W) -> (channels, H, W), for models built for more than one channel."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: Tensor) -> Tensor:
        return image.expand(self.channels, -1, -1).contiguous()


def _fashion_mnist_transforms(train_augment: bool, channels: int):
    from torchvision import transforms

    from ..datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    # Items are uint8 (1, 28, 28) tensors; no resize. Cropping 28-pixel images loses too much, so
    # the augmented variant only flips.
    steps = [transforms.ConvertImageDtype(torch.float32), transforms.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)]
    if channels > 1:
        steps.append(_RepeatChannels(channels))
    val = transforms.Compose(steps)
    train = transforms.Compose([transforms.RandomHorizontalFlip(), val]) if train_augment else val
    return train, val


def build_datasets(args: argparse.Namespace, train_augment: bool) -> tuple[Dataset, Dataset]:
    """(train, test) datasets for ``args.dataset``; ``train_augment`` picks the linear-probe train transform."""
    if args.dataset == "imagefolder":
        from torchvision.datasets import ImageFolder

        if not args.data_path:
            raise ValueError("--dataset imagefolder needs --data_path, a folder with train/ and val/ subfolders")
        train_tf, val_tf = _imagefolder_transforms(train_augment)
        train = ImageFolder(os.path.join(args.data_path, "train"), transform=train_tf)
        test = ImageFolder(os.path.join(args.data_path, "val"), transform=val_tf)
    elif args.dataset == "fashion_mnist":
        from ..datasets import FashionMNIST

        train_tf, val_tf = _fashion_mnist_transforms(train_augment, model_channels(args))
        train = FashionMNIST(train=True, transform=train_tf, root=args.data_path)
        test = FashionMNIST(train=False, transform=val_tf, root=args.data_path)
    else:
        raise ValueError(f"--dataset {args.dataset!r}, expected imagefolder or fashion_mnist")
    if args.subset is not None:
        if args.subset < 1:
            raise ValueError(f"--subset {args.subset}, expected a positive number of images")
        train = Subset(train, range(min(args.subset, len(train))))
        test = Subset(test, range(min(args.subset, len(test))))
    return train, test


def make_loader(dataset: Dataset, args: argparse.Namespace, shuffle: bool = False) -> DataLoader:
    device = resolve_device(args.device)
    return DataLoader(dataset, batch_size=args.batch_size_per_gpu, shuffle=shuffle,
                      num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=False)


def _create(arch: str, patch_size: int, in_chans: int, img_size: int) -> nn.Module:
    from ..models import create_model  # imported here: the CLI modules must import without it

    if arch.startswith("vit"):
        return create_model(arch, patch_size=patch_size, num_classes=0, in_chans=in_chans, img_size=img_size)
    if arch.startswith("timm:"):
        return create_model(arch, num_classes=0, in_chans=in_chans)
    if arch == "convnet":
        return create_model(arch, in_chans=in_chans)
    return create_model(arch)  # torchvision ResNets: 3 channels only


def model_channels(args: argparse.Namespace) -> int:
    """Input channels of the model: ``--in_chans``, else 1 for Fashion-MNIST and 3 otherwise.

    torchvision ResNets only take 3; Fashion-MNIST images are repeated to whatever this says.
    """
    if not (args.arch.startswith(("vit", "timm:")) or args.arch == "convnet"):
        return 3
    return args.in_chans or (1 if args.dataset == "fashion_mnist" else 3)


def build_backbone(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The frozen feature extractor of ``args.arch`` with ``args.pretrained_weights``, in eval mode.

    ViTs (``vit_*``) are built without a classifier and keep ``get_intermediate_layers``; a
    trailing classifier of other models is replaced by Identity, as the official eval does, so the
    pooled features come out and backbone-only weights load strictly.
    """
    from ..backbones import find_classifier

    img_size = args.img_size or (28 if args.dataset == "fashion_mnist" else 224)
    model = _create(args.arch, args.patch_size, model_channels(args), img_size)
    classifier = find_classifier(model)
    if classifier is not None:
        setattr(model, classifier, nn.Identity())
    if args.pretrained_weights:
        from ..checkpoint import load_into

        load_into(model, None, args.pretrained_weights, checkpoint_key=args.checkpoint_key,
                  trusted=args.trusted_checkpoint)
        print(f"Loaded {args.checkpoint_key!r} weights from {args.pretrained_weights}.")
    else:
        print("No --pretrained_weights: evaluating randomly initialised weights.")
    return model.to(device).eval()
