"""Errors users can act on. Every message names the file, key, flag or value at fault."""


class SDXSError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, without a traceback."""


class ConfigError(SDXSError):
    """A config.json field is unknown, unsupported or invalid."""


class WeightsError(SDXSError):
    """Weights are missing, corrupt, of the wrong shape/dtype, or from an incompatible converter."""


class ImageError(SDXSError):
    """An input image cannot be decoded or has an unusable size."""


class SourceError(SDXSError):
    """A camera or video source cannot be opened or stopped delivering frames."""


class BackendUnavailable(SDXSError):
    """An inference backend cannot run on this machine (e.g. CoreML prediction off macOS)."""
