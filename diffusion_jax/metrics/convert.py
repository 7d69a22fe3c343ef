"""Converts pytorch-fid's Inception weights (.pth) to the .npz that `InceptionV3` loads.

  python -m diffusion_jax.metrics.convert pt_inception-2015-12-05-6726825d.pth OUT.npz

Needs PyTorch (only this script does). The layout changes are those of `weights`.
"""

from __future__ import annotations

import sys

from diffusion_jax.metrics import weights


def convert_file(src, dst):
    """Reads the PyTorch state dict at ``src`` (on the CPU) and writes ``dst`` (.npz)."""
    import torch  # the converter alone needs PyTorch

    state_dict = torch.load(src, map_location="cpu", weights_only=True)
    flat = weights.convert_state_dict({k: v.numpy() for k, v in state_dict.items()})
    return weights.save_variables(flat, dst)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path = convert_file(argv[1], argv[2])
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
