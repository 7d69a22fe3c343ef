"""oneDNN convolutions (`diffusion_jax.models.onednn`): values and both gradients against
the float64 NumPy sums of tests/test_conv.py for every geometry the U-Net uses, the U-Net
with cpu_kernels='onednn' against XLA's, sharded input (partitioned over the batch), the
build cache, and bad input.

These tests need oneDNN's wheels (the install extra ``.[onednn]``, x86_64 Linux) and a
C++ compiler; they are skipped off x86_64 Linux, with no compiler, or without the wheels,
and otherwise fail with the reason."""

import json
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.models import UNet, conv, onednn

from tests.helpers import (ONE_LEVEL_FLAGS, ROOT, launch, launch_cmd, launch_env,
                           onednn_skip_reason)
from tests.test_conv import CASES, _numpy_conv_and_weight_grad
from tests.test_launch import _free_port
from tests.test_unet import TINY, _inputs, _param_shapes, _random_params

# The default path and the opt-in, compared.
_IMPLS = ("none", "onednn")

pytestmark = pytest.mark.skipif(onednn_skip_reason() is not None,
                                reason=str(onednn_skip_reason()))


# The tiny CIFAR run of the launch.py tests: one U-Net level, mocked data, 3 logged steps.
_TINY_RUN = (f"--config={ROOT / 'configs' / 'ddpm_cifar.py'}:tiny", "--config.data.mock=True",
             *ONE_LEVEL_FLAGS, "--config.train.num_steps=3", "--config.train.log_every=1",
             "--config.train.sample_every=0")


def _assert_leaves_close(got, want):
    """Leaf by leaf, to 1e-4 of each reference leaf's largest magnitude (float32 sums in
    another order)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)


def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.fixture(scope="module", autouse=True)
def _built():
    reason = onednn.unavailable_reason()
    assert reason is None, reason


@pytest.mark.parametrize("image, kernel_size, strides, padding", CASES)
def test_values_and_gradients_against_numpy(image, kernel_size, strides, padding):
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(image, kernel_size, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *image, 5)).astype(np.float32)
    kernel = rng.standard_normal((*kernel_size, 5, 6)).astype(np.float32)
    y = onednn.conv2d(jnp.asarray(x), jnp.asarray(kernel), strides, padding)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    want_y, want_dw = _numpy_conv_and_weight_grad(x, kernel, dy, strides, padding)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-4)
    _, vjp = jax.vjp(lambda x_, k_: onednn.conv2d(x_, k_, strides, padding), x, kernel)
    dx, dw = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-4)
    # dL/dx against XLA's transpose (itself checked against NumPy in test_conv.py).
    _, xla_vjp = jax.vjp(lambda x_: conv.conv2d(x_, kernel, strides, padding,
                                                 cpu_kernels="none"), x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(xla_vjp(jnp.asarray(dy))[0]),
                               rtol=1e-5, atol=1e-4)


def test_large_shape_under_jit():
    # The U-Net's 16x16 level at batch 8: blocked weight layouts and the reorders.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 64)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 64, 96)) / 24, jnp.float32)
    pads = ((1, 1), (1, 1))

    def loss(impl):
        return lambda x_, k_: jnp.sum(jnp.sin(conv.conv2d(x_, k_, (1, 1), pads, cpu_kernels=impl)))

    got = jax.jit(jax.value_and_grad(loss("onednn"), (0, 1)))(x, kernel)
    want = jax.jit(jax.value_and_grad(loss("none"), (0, 1)))(x, kernel)
    _assert_leaves_close(got, want)


def test_concurrent_calls_of_one_geometry():
    # Four independent convolutions of one shape (the CIFAR U-Net's first level) under one
    # grad: XLA runs their passes on several threads at once with one cached primitive.
    # With oneDNN's own scratchpad the calls shared a buffer and the gradients came out
    # wrong (relative errors near 1); each call now brings its own.
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.standard_normal((4, 32, 32, 32, 128)), jnp.float32)
    ks = jnp.asarray(rng.standard_normal((4, 3, 3, 128, 128)) / 34, jnp.float32)
    pads = ((1, 1), (1, 1))

    def loss(impl):
        def f(xs_, ks_):
            return sum(jnp.sum(jnp.sin(conv.conv2d(xs_[i], ks_[i], (1, 1), pads, cpu_kernels=impl)))
                       for i in range(4))
        return jax.jit(jax.grad(f, (0, 1)))

    want = loss("none")(xs, ks)
    got_fn = loss("onednn")
    for _ in range(2):
        _assert_leaves_close(got_fn(xs, ks), want)


def test_unet_matches_xla():
    x, t = _inputs(jax.random.key(1))
    params = _random_params(_param_shapes(UNet(**TINY), x, t), seed=0)
    models = {impl: UNet(**{**TINY, "dropout": 0.0}, cpu_kernels=impl) for impl in _IMPLS}
    outputs, grads = {}, {}
    for impl, model in models.items():
        apply = lambda p, model=model: model.apply({"params": p}, x, t, train=False)
        outputs[impl] = apply(params)
        grads[impl] = jax.grad(lambda p, apply=apply: jnp.sum(apply(p) ** 2))(params)
    scale = float(jnp.max(jnp.abs(outputs["none"])))
    np.testing.assert_allclose(outputs["onednn"], outputs["none"], atol=1e-5 * scale, rtol=0)
    # Gradients leaf by leaf, against the largest gradient of the whole tree (some leaves,
    # e.g. biases a GroupNorm removes, have a true gradient of zero and only rounding).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["none"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=0),
                 grads["onednn"], grads["none"])


def test_unet_calls_onednn_only_when_asked():
    x, t = _inputs(jax.random.key(1))

    def targets(cpu_kernels):
        model = UNet(**TINY, cpu_kernels=cpu_kernels)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))
        jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, x, t, train=False))(params))
        return set(re.findall(r"DjConv\w+", jaxpr))

    assert targets("onednn") == {"DjConvForward"}
    assert targets("none") == set()
    assert targets("dilated") == set()


@pytest.mark.parametrize("mesh_shape, batch_axes, batch", [
    ((8,), ("data",), 16),                 # one device per shard
    ((4, 2), ("data", "model"), 16),       # the batch over both axes of a 2-D mesh
    ((4, 2), ("data",), 16),               # over one of them: the sum is over 'data' only
    ((8,), None, 16),                      # whole on every device: nothing to sum
    ((1,), ("data",), 16),                 # one device: the bare call
])
def test_sharded_batch_matches_one_device(mesh_shape, batch_axes, batch):
    # XLA's partitioner splits each pass over the batch: every device calls oneDNN on its
    # shard (local shapes, this process's cores shared out), the kernel stays whole, and
    # the weight gradient is summed over the batch's mesh axes.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((batch, 8, 8, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 24)) / 12, jnp.float32)
    pads = ((1, 1), (1, 1))

    def loss(impl):
        return lambda x_, k_: jnp.sum(jnp.sin(conv.conv2d(x_, k_, (2, 2), pads, cpu_kernels=impl)))

    grad = jax.value_and_grad(loss("onednn"), (0, 1))
    want = jax.jit(jax.value_and_grad(loss("none"), (0, 1)))(x, kernel)
    devices = int(np.prod(mesh_shape))
    mesh = Mesh(np.asarray(jax.devices()[:devices]).reshape(mesh_shape),
                ("data", "model")[:len(mesh_shape)])
    spec = PartitionSpec(batch_axes) if batch_axes else PartitionSpec()
    f = jax.jit(grad, in_shardings=(NamedSharding(mesh, spec),
                                   NamedSharding(mesh, PartitionSpec())))
    got = f(x, kernel)
    _assert_leaves_close(got, want)

    shards = int(np.prod([mesh.shape[a] for a in batch_axes or ()]))
    split = devices > 1 and shards > 1 and batch % shards == 0
    hlo = f.lower(x, kernel).compile().as_text()
    calls = re.findall(r"f32\[([\d,]+)\][^\n]*custom_call_target=\"(DjConv\w+)\"", hlo)
    assert {target for _, target in calls} == set(onednn.FFI_TARGETS.values())
    local = batch // shards if split else batch
    for dims, target in calls:  # each device computes on its shard's shapes
        assert dims.split(",")[0] == ("3" if target == "DjConvBackwardWeights" else str(local))
    # The weight gradient's all-reduce (over the batch's axes only: summed over 'model'
    # too, the (4, 2) mesh's gradient with the batch over 'data' would come out doubled).
    assert bool(re.search(r"f32\[3,3,16,24\][^\n]*? all-reduce\(", hlo)) == split
    threads = {int(v) for v in re.findall(r"threads = (\d+)", hlo)}
    assert threads == ({onednn.sharded_threads(mesh)} if devices > 1
                       else {onednn.default_threads()})
    if split:
        assert got[1][0].sharding.spec == spec  # dL/dx stays split


def test_batch_axes_of_the_partitioning_rule():
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))

    def axes(shape, spec):
        sharding = NamedSharding(mesh, spec)
        return onednn._batch_axes(mesh, [jax.ShapeDtypeStruct(shape, jnp.float32,
                                                              sharding=sharding)])

    assert axes((12, 8, 8, 16), PartitionSpec("data")) == "data"
    assert axes((16, 8, 8, 16), PartitionSpec(("data", "model"))) == ("data", "model")
    # A batch of 12 over 8 shards would be padded, and the padding summed into the weight
    # gradient: it stays whole.
    assert axes((12, 8, 8, 16), PartitionSpec(("data", "model"))) is None
    assert axes((16, 8, 8, 16), PartitionSpec()) is None
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match=r"need the batch's sharding on a named mesh; got "
                                         r"SingleDeviceSharding.*NamedSharding in_shardings"):
        onednn._batch_axes(mesh, [jax.ShapeDtypeStruct((16, 8, 8, 16), jnp.float32,
                                                       sharding=one_device)])


def test_unpartitioned_call_on_a_sharded_batch_is_refused():
    # The bare FFI call, outside the partitioning rule: XLA's partitioner would run it on
    # each shard with the global shapes and return wrong values. It is marked as a side
    # effect so that compiling fails instead.
    x, kernel = jnp.ones((8, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    f = jax.jit(lambda x_, k_: onednn._ffi("forward", x_, k_, (8, 8), (1, 1),
                                           ((1, 1), (1, 1)), 1),
                in_shardings=(sharded, None), out_shardings=sharded)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"Side-effect ops cannot be replicated"):
        f(jax.device_put(x, sharded), kernel)


def test_thread_counts(monkeypatch):
    monkeypatch.setattr(onednn, "_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert onednn.default_threads() == 8
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
    assert onednn.sharded_threads(mesh) == 4
    assert onednn.sharded_threads(Mesh(np.asarray(jax.devices()[:8]), ("data",))) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert onednn.default_threads() == 3 and onednn.sharded_threads(mesh) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "none")
    assert onednn.default_threads() == 8


def test_vmap_matches_xla():
    # vmap over images with one kernel (the mapped axis joins the batch), over image and
    # kernel pairs (one call each), and nested, against XLA's convolution.
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 4)), jnp.float32)
    kernels = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 5)) / 6, jnp.float32)
    pads = ((1, 1), (0, 2))

    def cases(impl):
        f = jax.value_and_grad(
            lambda a, b: jnp.sum(jnp.sin(conv.conv2d(a, b, (1, 2), pads, cpu_kernels=impl))), (0, 1))
        nested = jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(None, 0))
        return (jax.jit(jax.vmap(f, in_axes=(0, None)))(x, kernels[0]),
                jax.jit(jax.vmap(f))(x, kernels), nested(x[:, :1], kernels))

    got, want = cases("onednn"), cases("none")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda a: onednn.conv2d(a, kernels[0], (1, 2), pads)))(x))
    assert "DjConvForward" in jaxpr


def test_only_needed_gradients_are_computed():
    x, kernel = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
    pads = ((1, 1), (1, 1))

    def targets(jaxpr):  # how often the program calls each pass, nested jaxprs included
        names = re.findall(r"target_name=(\w+)", str(jaxpr))
        return {kind: names.count(target) for kind, target in onednn.FFI_TARGETS.items()}

    loss = lambda x_, k_: onednn.conv2d(x_, k_, (1, 1), pads).sum()
    only_kernel = jax.make_jaxpr(jax.grad(loss, argnums=1))(x, kernel).jaxpr
    both = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel).jaxpr
    assert targets(only_kernel) == {"forward": 1, "input_grad": 0, "weight_grad": 1}
    assert targets(both) == {"forward": 1, "input_grad": 1, "weight_grad": 1}


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
    include, lib = onednn._find_onednn()
    first = onednn._build(include, lib)
    assert first.is_file() and first.parent == tmp_path / "onednn"
    mtime = first.stat().st_mtime_ns
    assert onednn._build(include, lib) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporaries left


def test_bad_input():
    x = jnp.ones((2, 8, 8, 4))
    kernel = jnp.ones((3, 3, 4, 5))
    pads = ((1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"computes in float32; got x bfloat16"):
        onednn.conv2d(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1), pads)
    with pytest.raises(ValueError, match=r"x has 3 channels and the kernel expects 4"):
        onednn.conv2d(jnp.ones((2, 8, 8, 3)), kernel, (1, 1), pads)
    with pytest.raises(ValueError, match=r"rank 4"):
        onednn.conv2d(jnp.ones((8, 8, 4)), kernel, (1, 1), pads)
    with pytest.raises(ValueError, match=r"padding non-negative; got strides \(2, 2\) and "
                                         r"padding \(\(0, -1\), \(0, -1\)\)"):
        onednn.conv2d(x, kernel, (2, 2), ((0, -1), (0, -1)))
    with pytest.raises(ValueError, match=r"does not fit"):
        onednn.conv2d(jnp.ones((2, 2, 2, 4)), kernel, (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match=r"cpu_kernels must be one of \['none', 'dilated', "
                                         r"'onednn'\]; got 'mkl'"):
        conv.conv2d(x, kernel, cpu_kernels="mkl")


def test_missing_library_or_compiler_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_prefixes", lambda: [tmp_path])
    with pytest.raises(onednn.OneDNNUnavailableError,
                       match=r"install the project's onednn extra \(`pip install -e "
                             r"\"\.\[onednn\]\"`"):
        onednn._find_onednn()
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(onednn.OneDNNUnavailableError, match=r"need a C\+\+17 compiler"):
        onednn._compiler()


def test_launch_trains_as_with_xla(tmp_path):
    # The same run with each convolution library: the losses of the first steps agree to
    # float32 rounding (data parallel: test_two_processes_train_as_one, and in one process
    # test_sharded_batch_matches_one_device).
    losses = {}
    for impl in _IMPLS:
        workdir = tmp_path / impl
        launch(*_TINY_RUN, f"--config.model.cpu_kernels={impl}", f"--workdir={workdir}",
               devices=1)
        losses[impl] = _losses(workdir)
        assert json.loads((workdir / "config.json").read_text())["model"]["cpu_kernels"] == impl
    assert len(losses["onednn"]) == 3 and np.all(np.isfinite(losses["onednn"]))
    np.testing.assert_allclose(losses["onednn"], losses["none"], rtol=1e-4)


def _two_processes(workdir, flags, env_of=lambda i: {}):
    port = _free_port()
    procs = [
        subprocess.Popen(
            launch_cmd(*flags, f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={i}"),
            cwd=ROOT, env={**launch_env(devices=1), **env_of(i)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    return [(p, *p.communicate(timeout=600)) for p in procs]


def test_two_processes_train_as_one(tmp_path):
    # Two hosts of one device each with oneDNN's convolutions: the losses of one process
    # with two devices and XLA's, to float32 rounding.
    flags = (*_TINY_RUN, "--config.model.cpu_kernels=onednn")
    for proc, _, err in _two_processes(tmp_path / "multi", flags):
        assert proc.returncode == 0, err[-4000:]
    launch(*_TINY_RUN, f"--workdir={tmp_path / 'single'}", devices=2)
    losses = {name: _losses(tmp_path / name) for name in ("multi", "single")}
    assert len(losses["multi"]) == 3
    np.testing.assert_allclose(losses["multi"], losses["single"], rtol=1e-4)
