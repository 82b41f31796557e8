"""`python -m convert.coreml ARGS` = `mlx-sdxs export coreml ARGS`."""

import sys

from mlx_sdxs.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", "coreml", *sys.argv[1:]]))
