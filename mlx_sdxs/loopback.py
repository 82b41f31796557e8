"""This machine only: the address every mlx-sdxs server binds unless told otherwise (the studio, the camera's
preview page, a control port), and the names a browser may use for it."""

#: What a server listens on by default: reachable from this machine only.
HOST = "127.0.0.1"
#: Host names that mean this machine: a server bound elsewhere warns (and the studio serves HTTPS).
NAMES = (HOST, "localhost", "::1")
