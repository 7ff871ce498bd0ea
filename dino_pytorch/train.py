"""``python -m dino_pytorch.train``: an alias of the training program, :mod:`dino_pytorch.cli.train`."""
import sys

from .cli.train import get_args_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
