"""Data: the synthetic set (synth), preparation (prepare), the audio bank, the manifest and
the read API `Dataset.open(OUT)`."""
from .dataset import Dataset

__all__ = ["Dataset"]
