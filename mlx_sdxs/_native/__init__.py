"""The native CPU kernels' sources (C++17, CMake, nanobind) and their build (`python -m mlx_sdxs._native.build`).

The built module `_ext` and `build-info.json` land in this folder (git-ignored); `mlx_sdxs.native` loads
them (and reads the record's path from `build`); nothing else imports this package.
"""
