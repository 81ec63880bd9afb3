"""rmt-bench: reproduce the Recurrent Memory Transformer paper's benchmarks (Bulatov et al., NeurIPS 2022)."""

__version__ = "0.1.0"
