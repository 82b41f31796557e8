"""`python -m convert.mlx ARGS` = `mlx-sdxs convert ARGS`."""

import sys

from mlx_sdxs.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
