"""The Flax Inception against pytorch-fid's, with shared RANDOM weights (no download).

pytorch-fid (with PyTorch on the CPU) builds its FID Inception by its own code; only its
two weight-loading calls are replaced (no download, no loading), so every layer keeps its
random initialisation. The batch-norm statistics are then set from one training-mode pass
over random images (so activations keep their scale through 94 layers) and the scales and
shifts drawn at random. `weights.convert_state_dict` carries everything to the Flax
model. Tolerance: max |flax - torch| <= 1e-4 * max |torch| per output.

PyTorch and pytorch-fid come with the ``test`` extra (``pip install -e ".[test]"``): where
they are missing these tests FAIL, they are not skipped.
"""

import jax
import numpy as np
import pytest

from diffusion_jax.metrics import inception, weights
from experiments import benchmark_torch

try:
    import torch
    import torch.nn.functional as F
    from pytorch_fid import inception as pt_inception  # noqa: F401
except ImportError as e:  # pragma: no cover - fails below, never skips
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None

RTOL = 1e-4


@pytest.fixture(scope="module")
def torch_nets():
    if _IMPORT_ERROR is not None:
        pytest.fail(f"The parity check needs PyTorch and pytorch-fid ({_IMPORT_ERROR}); "
                    'install the test extra: pip install -e ".[test]".', pytrace=False)
    torch.manual_seed(0)
    wrapper, net = benchmark_torch.fid_inception_without_weights()
    _randomize_batch_norm(wrapper)
    return wrapper.eval(), net.eval()


def _randomize_batch_norm(wrapper):
    """Running statistics from one training-mode pass, then random scales and shifts."""
    norms = [m for m in wrapper.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: this one batch's statistics
    wrapper.train()
    with torch.no_grad():
        wrapper(torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(1)))
        gen = torch.Generator().manual_seed(2)
        for m in norms:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


@pytest.fixture(scope="module")
def flax_variables(torch_nets):
    _, net = torch_nets
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    return weights.unflatten_variables(weights.convert_state_dict(state))


def _torch_outputs(torch_nets, images_nhwc):
    wrapper, net = torch_nets
    with torch.no_grad():
        x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())
        pool = wrapper(x)[0].flatten(1)
        return {"pool": pool.numpy(), "logits": net.fc(pool).numpy(),
                "logits_unbiased": (pool @ net.fc.weight.T).numpy()}


def _assert_close(flax_out, torch_out):
    for name, ref in torch_out.items():
        got = np.asarray(flax_out[name])
        assert got.shape == ref.shape, name
        scale = np.abs(ref).max()
        assert scale > 1e-3, f"{name}: degenerate reference (max |.| = {scale})"
        err = np.abs(got - ref).max() / scale
        assert err <= RTOL, f"{name}: max |flax - torch| / max |torch| = {err:.2e}"


def test_resize_equals_torch_interpolate_bilinear():
    if _IMPORT_ERROR is not None:
        pytest.fail(f"needs PyTorch ({_IMPORT_ERROR})", pytrace=False)
    rng = np.random.default_rng(0)
    resize = jax.jit(inception.resize_bilinear)
    for h, w in [(8, 8), (32, 32), (64, 48), (299, 299), (400, 350), (600, 301)]:
        x = rng.random((2, h, w, 3), dtype=np.float32)
        ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=(299, 299),
                            mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(resize(x)), ref, rtol=0, atol=1e-6)


def test_features_and_logits_match_pytorch_fid(torch_nets, flax_variables):
    rng = np.random.default_rng(3)
    # The whole module, resize included, on 32x32 images (CIFAR-10's size).
    full = jax.jit(inception.InceptionV3().apply)
    x = rng.random((2, 32, 32, 3), dtype=np.float32)
    _assert_close(full(flax_variables, x), _torch_outputs(torch_nets, x))
    # Other sizes, growing, equal and shrinking: the same resize, then the network at 299
    # (compiled once).
    resize = jax.jit(inception.resize_bilinear)
    net = jax.jit(inception.InceptionV3(resize_input=False).apply)
    for h, w in [(299, 299), (400, 350)]:
        x = rng.random((2, h, w, 3), dtype=np.float32)
        _assert_close(net(flax_variables, resize(x)), _torch_outputs(torch_nets, x))
