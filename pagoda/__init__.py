"""pagoda: PaGoDA (NeurIPS 2024) — a one-step generator grown from a low-resolution diffusion teacher."""

__version__ = "0.1.0"
