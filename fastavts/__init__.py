"""fastavts: high-throughput self-supervised audio-visual synchronization (AVTS) training."""
__version__ = "0.1.0"
