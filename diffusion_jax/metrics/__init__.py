"""Sample quality: FID, KID, Inception Score, precision/recall, and an offline digits FID.

Importable without the training system. The Inception network is pytorch-fid's
(`inception`), with weights converted by `convert` and loaded by `weights`.
"""

from diffusion_jax.metrics import (  # noqa: F401
    digits,
    features,
    fid,
    inception,
    inception_score,
    kid,
    precision_recall,
    weights,
)
