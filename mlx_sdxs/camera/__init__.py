"""Live camera img2img: sources → 3-thread loop (capture, inference, display) → outputs.

Knows only the Backend protocol.
"""
