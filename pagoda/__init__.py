"""pagoda: PaGoDA (NeurIPS 2024) — a one-step generator grown from a low-resolution diffusion teacher."""
import os

# OpenMP threads sleep at barriers instead of spinning: with other processes on the cores, spinning threads wait a
# whole scheduler slice for a descheduled peer (60x slower; pagoda/dist.py ThreadPolicy). Read once, when torch
# loads its OpenMP runtime, so it is set here, before any torch import; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
