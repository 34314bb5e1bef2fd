"""fastavts: high-throughput self-supervised audio-visual synchronization (AVTS) training."""
from ._version import __version__  # noqa: F401


def __getattr__(name):
    # `fastavts.AVTS` without importing torch for every `import fastavts` (the CLI's --help)
    if name == "AVTS":
        from .models.avts import AVTS
        return AVTS
    raise AttributeError(f"module 'fastavts' has no attribute {name!r}")
