"""2-D convolutions computed by oneDNN on the CPU, through XLA's FFI.

XLA's CPU backend runs convolutions in YNNPACK (or Eigen). On the 2-core x86 machine of
the README's Performance section those kernels reach 175-200 GFLOP/s forward and less for
the weight gradient, while oneDNN (the library PyTorch uses on CPUs) runs the same NHWC
convolutions at 205-240 GFLOP/s in all three passes. `conv2d` here calls oneDNN for the
forward convolution, the input gradient and the weight gradient (a ``custom_vjp``), and
leaves every other op of the program to XLA. It is an opt-in: the U-Net takes it with
``cpu_kernels='onednn'`` (config ``model.cpu_kernels``; `diffusion_jax.models.conv`), and
nothing here is imported, built or loaded otherwise.

Requirements (the install extra ``pip install -e ".[onednn]"`` brings the first two on
x86_64 Linux):

- oneDNN's shared library and headers: the PyPI wheels ``onednn-cpu-gomp`` and
  ``onednn-devel-cpu-gomp`` (oneDNN 3.2, GNU OpenMP threading), found under the Python
  prefix (``<prefix>/lib/libdnnl.so.3``, ``<prefix>/include/oneapi/dnnl/dnnl.hpp``);
- a C++17 compiler (``$CXX`` or ``g++``): the handlers in ``onednn_conv.cc`` are compiled
  on first use, against the headers of the installed jaxlib, into
  ``$DIFFUSION_JAX_CACHE`` (default ``~/.cache/diffusion_jax``), once per source, jaxlib
  version, oneDNN version and library, compiler identity (its path and ``--version``) and
  flags; later processes load the cached library.

Limits: float32 only, CPU only, NHWC input and HWIO kernels, non-negative padding.

Devices: on one JAX CPU device the oneDNN calls use every core (OpenMP threads;
``OMP_NUM_THREADS`` sets their number, `default_threads`). In a program whose batch is
sharded over a mesh (``jit`` with a ``NamedSharding``, as the training system does with
one device per core or several hosts), each pass carries a partitioning rule
(``custom_partitioning``): XLA's partitioner gives every device its shard of the batch,
which it convolves with oneDNN on its own share of the process's cores
(`sharded_threads`), the kernel stays whole, and the weight gradient is summed over the
batch's mesh axes (an all-reduce). Only the batch is split; any other sharding of the
operands is gathered first. The bare FFI call is marked as having a side effect, so that
a call that reached the partitioner without the rule would be refused when compiled
rather than run per shard with the global shapes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import platform
import shutil
import site
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax.models._custom_conv import conv_with_gradients

__all__ = ["FFI_TARGETS", "OneDNNUnavailableError", "conv2d", "load", "unavailable_reason"]

_SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
# The FFI targets by pass; each takes two operands and returns one array.
FFI_TARGETS = {
    "forward": "DjConvForward",
    "input_grad": "DjConvBackwardData",
    "weight_grad": "DjConvBackwardWeights",
}
# The handlers' OpenMP calls resolve to the GNU OpenMP that libdnnl.so.3 loads, so no
# -fopenmp (which would link another runtime under clang).
_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-w")
_WHEELS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

Padding = tuple[tuple[int, int], tuple[int, int]]


class OneDNNUnavailableError(RuntimeError):
    """oneDNN convolutions were asked for but cannot be built or loaded here."""


def _wheel_prefixes() -> list[pathlib.Path]:
    """Where the wheels put their files (their data directory), from their metadata:
    pip's --prefix, --user or a distribution's scheme may differ from ``sys.prefix``."""
    found = []
    for name in _WHEELS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            path = pathlib.Path(os.path.normpath(file.locate()))
            if path.name == "libdnnl.so.3" and path.parent.name == "lib":
                found.append(path.parents[1])
            elif path.name == "dnnl.hpp" and path.parts[-4:-1] == ("include", "oneapi", "dnnl"):
                found.append(path.parents[3])
    return found


def _prefixes() -> list[pathlib.Path]:
    candidates = [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None),
                  *_wheel_prefixes()]
    return list(dict.fromkeys(pathlib.Path(c).resolve() for c in candidates if c))


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
    """(include dir, lib dir) of an installed oneDNN 3, or OneDNNUnavailableError."""
    for prefix in _prefixes():
        include, lib = prefix / "include", prefix / "lib"
        if (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (
                lib / "libdnnl.so.3").exists():
            return include, lib
    raise OneDNNUnavailableError(
        "oneDNN's library and headers were not found under "
        f"{[str(p) for p in _prefixes()]} (lib/libdnnl.so.3, include/oneapi/dnnl/dnnl.hpp): "
        "install the project's onednn extra (`pip install -e \".[onednn]\"`, the "
        "onednn-cpu-gomp and onednn-devel-cpu-gomp wheels, x86_64 Linux only)."
    )


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise OneDNNUnavailableError(
            "the oneDNN FFI handlers are compiled on first use and need a C++17 "
            "compiler: none found ($CXX, g++, c++). Install one (e.g. Debian's g++)."
        )
    return compiler


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("DIFFUSION_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "diffusion_jax")
    return pathlib.Path(root) / "onednn"


def onednn_version(include: pathlib.Path) -> str:
    """oneDNN's version as its header ``dnnl_version.h`` states it ('3.2.0'), else the
    wheel's version, else 'unknown'."""
    header = include / "oneapi" / "dnnl" / "dnnl_version.h"
    if header.is_file():
        fields = {}
        for line in header.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("DNNL_VERSION_"):
                fields[parts[1]] = parts[2]
        parts = [fields.get(f"DNNL_VERSION_{k}") for k in ("MAJOR", "MINOR", "PATCH")]
        if all(parts):
            return ".".join(parts)
    try:
        return "wheel " + importlib.metadata.version(_WHEELS[0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def compiler_identity(compiler: str) -> str:
    """The compiler's resolved path and the first line of its ``--version``: a cached build
    is reused only by the compiler that made it."""
    path = shutil.which(compiler) or compiler
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True,
                                check=False, timeout=30)
        first = (result.stdout or result.stderr).strip().splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as error:
        first = [f"unrunnable: {error}"]
    return f"{os.path.realpath(path)} {' '.join(first)}"


def _build(include: pathlib.Path, lib: pathlib.Path) -> pathlib.Path:
    """The compiled handlers, from the cache or built now (written under a temporary
    name and renamed, so a concurrent or interrupted build never leaves a torn file)."""
    source = _SOURCE.read_bytes()
    jax_include = pathlib.Path(jax.ffi.include_dir())
    compiler = _compiler()
    digest = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(), str((lib / "libdnnl.so.3").resolve()).encode(),
        onednn_version(include).encode(), compiler_identity(compiler).encode(),
        " ".join(_FLAGS).encode(),
    ])).hexdigest()[:16]
    target = _cache_dir() / f"djconv_{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = pathlib.Path(tmp) / target.name
        command = [compiler, *_FLAGS, str(_SOURCE), "-o", str(out), f"-I{include}",
                   f"-I{jax_include}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise OneDNNUnavailableError(
                f"building the oneDNN convolution handlers failed ({' '.join(command)}):\n"
                f"{result.stderr[-4000:]}"
            )
        os.replace(out, target)
    return target


def load() -> None:
    """Builds (once) and registers the FFI targets; raises OneDNNUnavailableError with
    what is missing. Idempotent and thread-safe."""
    with _LOCK:
        if "error" in _STATE:
            raise _STATE["error"]  # type: ignore[misc]
        if "library" in _STATE:
            return
        try:
            platform_reason = _platform_reason()
            if platform_reason is not None:
                raise OneDNNUnavailableError(platform_reason)
            try:
                path = _build(*_find_onednn())
            except OSError as error:  # a compiler that cannot run, a cache not writable
                raise OneDNNUnavailableError(
                    f"building the oneDNN convolution handlers failed: {error}") from None
            library = ctypes.cdll.LoadLibrary(str(path))
        except (OneDNNUnavailableError, OSError) as error:
            failure = error if isinstance(error, OneDNNUnavailableError) else (
                OneDNNUnavailableError(f"loading the oneDNN convolution handlers failed: {error}"))
            _STATE["error"] = failure
            raise failure from None
        for name in FFI_TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                        platform="cpu")
        _STATE["library"] = library


def _platform_reason() -> str | None:
    """Why this machine cannot run the handlers at all, or None."""
    if jax.default_backend() != "cpu":
        return (f"the oneDNN convolutions run on the CPU backend; the default backend is "
                f"{jax.default_backend()!r}.")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (f"oneDNN's wheels exist for x86_64 Linux only; this is "
                f"{platform.system()} on {platform.machine()}.")
    return None


def unavailable_reason(build: bool = True) -> str | None:
    """None when oneDNN convolutions can be used here, else why not. With ``build`` the
    handlers are built (or taken from the cache) and loaded; without, only the platform,
    the wheels and the compiler are looked for."""
    if not build:
        try:
            reason = _platform_reason()
            if reason is None:
                _find_onednn()
                _compiler()
        except OneDNNUnavailableError as error:
            return str(error)
        return reason
    try:
        load()
    except OneDNNUnavailableError as error:
        return str(error)
    return None


def _attributes(strides: tuple[int, int], padding: Padding) -> dict[str, np.int64]:
    (lo_h, hi_h), (lo_w, hi_w) = padding
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                pad_lo_h=np.int64(lo_h), pad_hi_h=np.int64(hi_h),
                pad_lo_w=np.int64(lo_w), pad_hi_w=np.int64(hi_w))


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """OpenMP threads of a oneDNN call in a program on one device: ``OMP_NUM_THREADS``
    (its first entry) when set to a positive number, else every core of this process."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else _cores()


def sharded_threads(mesh) -> int:
    """OpenMP threads of each oneDNN call in a program partitioned over ``mesh``: this
    process's cores shared by its devices of the mesh (at least one), since every device
    runs its shard at the same time. ``OMP_NUM_THREADS`` still caps it. (Under
    ``shard_map`` or ``pmap`` the program is already per device and the calls take
    `default_threads`: set ``OMP_NUM_THREADS`` to the cores per device there.)"""
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return max(1, min(default_threads(), _cores() // max(1, local)))


def _result_shape(kind: str, a_shape, b_shape, spatial) -> tuple[int, int, int, int]:
    # forward (x, kernel) -> y; input_grad (dy, kernel) -> dx; weight_grad (x, dy) -> dkernel.
    if kind == "forward":
        return (a_shape[0], *spatial, b_shape[3])
    if kind == "input_grad":
        return (a_shape[0], *spatial, b_shape[2])
    return (*spatial, a_shape[3], b_shape[3])


def _ffi(kind: str, a, b, spatial, strides, padding, threads: int):
    # has_side_effect: a call that reaches XLA's partitioner unpartitioned (not through
    # `_pass`'s rule) would be split over a sharded batch with the wrong (global) shapes
    # and return wrong values; marked as a side effect, it is refused at compile time
    # instead ("Side-effect ops cannot be replicated").
    shape = _result_shape(kind, a.shape, b.shape, spatial)
    return jax.ffi.ffi_call(FFI_TARGETS[kind], jax.ShapeDtypeStruct(shape, jnp.float32),
                            has_side_effect=True)(
        a, b, **_attributes(strides, padding), threads=np.int64(threads))


# One pass (static: kind, the result's spatial size, strides, padding) as an op XLA's
# partitioner splits over the batch: in a program on one device it is the FFI call with
# `default_threads()`; in a partitioned one, each device calls oneDNN on its shard of the
# batch with `sharded_threads(mesh)` threads, kernels replicated, and the weight gradient
# is summed over the batch's mesh axes. Every other dimension is kept whole.
@functools.partial(custom_partitioning, static_argnums=(2, 3, 4, 5))
def _pass(a, b, kind, spatial, strides, padding):
    return _ffi(kind, a, b, spatial, strides, padding, default_threads())


def _batch_axes(mesh, arg_shapes):
    """The mesh axes the batch is split over (None: whole on every device). A batch that
    does not divide evenly stays whole: XLA would pad the last shards, and the padding
    would enter the summed weight gradient."""
    sharding = arg_shapes[0].sharding
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"oneDNN convolutions in a partitioned program need the batch's sharding on a "
            f"named mesh; got {sharding!r}. Pass jax.sharding.NamedSharding in_shardings "
            f"(or run under a mesh), or use cpu_kernels='none'.")
    spec = sharding.spec
    batch = spec[0] if len(spec) else None
    if batch is None:
        return None
    axes = (batch,) if isinstance(batch, str) else batch
    shards = math.prod(mesh.shape[a] for a in axes)
    return batch if arg_shapes[0].shape[0] % shards == 0 else None


def _shardings(kind, mesh, arg_shapes):
    batch = _batch_axes(mesh, arg_shapes)
    data = NamedSharding(mesh, PartitionSpec(batch))
    whole = NamedSharding(mesh, PartitionSpec())
    if kind == "weight_grad":
        return batch, (data, data), whole
    return batch, (data, whole), data


def _partition(kind, spatial, strides, padding, mesh, arg_shapes, result_shape):
    del result_shape
    batch, arg_shardings, result_sharding = _shardings(kind, mesh, arg_shapes)
    threads = sharded_threads(mesh)

    def lower(a, b):
        out = _ffi(kind, a, b, spatial, strides, padding, threads)
        if kind == "weight_grad" and batch is not None:
            out = jax.lax.psum(out, batch)
        return out

    return mesh, lower, result_sharding, arg_shardings


def _infer_sharding(kind, spatial, strides, padding, mesh, arg_shapes, result_shape):
    del spatial, strides, padding, result_shape
    return _shardings(kind, mesh, arg_shapes)[2]


def _sharding_rule(kind, *_):
    rule = {"forward": "n h w c, k l c o -> n p q o",
            "input_grad": "n p q o, k l c o -> n h w c",
            "weight_grad": "n h w c, n p q o -> k l c o"}[kind]
    # Only the batch (n) may be split; Shardy wants the factors in order of appearance.
    factors = tuple(dict.fromkeys(f for f in rule if f.isalpha()))
    return rule, dict(need_replication_factors=tuple(f for f in factors if f != "n"),
                      reduction_factors=("n",) if kind == "weight_grad" else ())


_pass.def_partition(_partition, infer_sharding_from_operands=_infer_sharding,
                    propagate_user_sharding=None, sharding_rule=_sharding_rule)


@functools.cache
def _batchable_pass(kind, spatial, strides, padding):
    """`_pass` with these static arguments, under ``vmap`` too (``custom_partitioning``
    has no batching rule): a mapped axis over the images of a forward pass or an input
    gradient with one kernel joins the batch (one oneDNN call); anything else runs one
    call per mapped element."""

    @jax.custom_batching.custom_vmap
    def f(a, b):
        return _pass(a, b, kind, spatial, strides, padding)

    @f.def_vmap
    def _rule(axis_size, in_batched, a, b):
        a_batched, b_batched = in_batched
        if kind != "weight_grad" and a_batched and not b_batched:
            out = f(a.reshape(axis_size * a.shape[1], *a.shape[2:]), b)
            return out.reshape(axis_size, a.shape[1], *out.shape[1:]), True
        a = a if a_batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        b = b if b_batched else jnp.broadcast_to(b, (axis_size, *b.shape))
        return jax.lax.map(lambda ab: f(*ab), (a, b)), True

    return f


def _forward(x, kernel, strides, padding):
    spatial = _output_shape(x.shape, kernel.shape, strides, padding)[1:3]
    return _batchable_pass("forward", spatial, strides, padding)(x, kernel)


def _input_grad(x, kernel, dy, strides, padding):
    return _batchable_pass("input_grad", tuple(x.shape[1:3]), strides, padding)(dy, kernel)


def _weight_grad(x, kernel, dy, strides, padding):
    return _batchable_pass("weight_grad", tuple(kernel.shape[:2]), strides, padding)(x, dy)


_conv = conv_with_gradients(_forward, _input_grad, _weight_grad)


def _output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, int, int, int]:
    spatial = [(size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in
               zip(x_shape[1:3], kernel_shape[:2], strides, padding)]
    return (x_shape[0], *spatial, kernel_shape[3])


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC',
    'HWIO', 'NHWC'))`` computed by oneDNN, differentiable in ``x`` and ``kernel`` (both
    gradients by oneDNN too).

    Args:
      x: (B, H, W, C_in) float32.
      kernel: (KH, KW, C_in, C_out) float32.
      strides: window strides (rows, columns), positive.
      padding: ((lo, hi), (lo, hi)) per spatial axis, non-negative.

    Raises:
      ValueError: other dtypes or ranks, channel counts that differ, negative padding or
        an empty output.
      OneDNNUnavailableError: oneDNN or a compiler is missing (the message says which).
    """
    if jnp.ndim(x) != 4 or jnp.ndim(kernel) != 4:
        raise ValueError(f"onednn.conv2d: x must be NHWC and kernel HWIO (rank 4); got shapes "
                         f"{jnp.shape(x)} and {jnp.shape(kernel)}")
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise ValueError(f"onednn.conv2d computes in float32; got x {x.dtype} and kernel "
                         f"{kernel.dtype}. Use cpu_kernels='none' for other dtypes.")
    if x.shape[3] != kernel.shape[2]:
        raise ValueError(f"onednn.conv2d: x has {x.shape[3]} channels and the kernel expects "
                         f"{kernel.shape[2]} (shapes {x.shape} and {kernel.shape})")
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if min(strides) < 1 or min(v for pair in padding for v in pair) < 0:
        raise ValueError(f"onednn.conv2d: strides must be positive and padding non-negative; "
                         f"got strides {strides} and padding {padding}")
    if min(_output_shape(x.shape, kernel.shape, strides, padding)[1:3]) < 1:
        raise ValueError(f"onednn.conv2d: the kernel {kernel.shape[:2]} does not fit the padded "
                         f"input {x.shape[1:3]} with padding {padding}")
    load()
    return _conv(x, kernel, strides, padding)
