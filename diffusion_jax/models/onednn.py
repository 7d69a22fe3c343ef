"""2-D convolutions computed by oneDNN on the CPU, through XLA's FFI.

XLA's CPU backend runs convolutions in YNNPACK (or Eigen). On the 2-core x86 machine of
the README's Performance section those kernels reach 175-200 GFLOP/s forward and less for
the weight gradient, while oneDNN (the library PyTorch uses on CPUs) runs the same NHWC
convolutions at 205-240 GFLOP/s in all three passes. `conv2d` here calls oneDNN for the
forward convolution, the input gradient and the weight gradient (a ``custom_vjp``), and
leaves every other op of the program to XLA. The U-Net takes it with
``conv_impl='onednn'`` (config ``model.conv_impl``).

Requirements (the ``onednn`` extra, ``pip install -e ".[onednn]"``, brings the first two):

- oneDNN's shared library and headers: the PyPI wheels ``onednn-cpu-gomp`` and
  ``onednn-devel-cpu-gomp`` (oneDNN 3.2, GNU OpenMP threading), found under the Python
  prefix (``<prefix>/lib/libdnnl.so.3``, ``<prefix>/include/oneapi/dnnl/dnnl.hpp``);
- a C++17 compiler (``$CXX`` or ``g++``): the handlers in ``onednn_conv.cc`` are compiled
  on first use, against the headers of the installed jaxlib, into
  ``$DIFFUSION_JAX_CACHE`` (default ``~/.cache/diffusion_jax``), once per source, jaxlib
  and oneDNN version; later processes load the cached library.

Limits: float32 only, CPU only, NHWC input and HWIO kernels, non-negative padding, and
one device: XLA cannot partition the FFI call, so a program that shards its input over
several devices is refused when it is compiled (the call is marked as having a side
effect; unmarked, the partitioner would run it on each shard with the global shapes and
return wrong values). Use it with one JAX CPU device, whose oneDNN calls use every core
(OpenMP threads; ``OMP_NUM_THREADS`` sets their number); the training system checks this
(``model.conv_impl='onednn'`` with more than one device is a configuration error).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
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

from diffusion_jax.models._custom_conv import conv_with_gradients

__all__ = ["FFI_TARGETS", "OneDNNUnavailableError", "conv2d", "load", "unavailable_reason"]

_SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
# The FFI targets by pass; each takes two operands and returns one array.
FFI_TARGETS = {
    "forward": "DjConvForward",
    "input_grad": "DjConvBackwardData",
    "weight_grad": "DjConvBackwardWeights",
}
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

Padding = tuple[tuple[int, int], tuple[int, int]]


class OneDNNUnavailableError(RuntimeError):
    """oneDNN convolutions were asked for but cannot be built or loaded here."""


def _prefixes() -> list[pathlib.Path]:
    candidates = [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None)]
    return [pathlib.Path(p) for p in dict.fromkeys(c for c in candidates if c)]


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
    """(include dir, lib dir) of an installed oneDNN 3, or OneDNNUnavailableError."""
    for prefix in _prefixes():
        include, lib = prefix / "include", prefix / "lib"
        if (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (
                lib / "libdnnl.so.3").exists():
            return include, lib
    raise OneDNNUnavailableError(
        "conv_impl='onednn' needs oneDNN's library and headers, looked for under "
        f"{[str(p) for p in _prefixes()]} (lib/libdnnl.so.3, include/oneapi/dnnl/dnnl.hpp): "
        "install them with `pip install -e \".[onednn]\"` (the onednn-cpu-gomp and "
        "onednn-devel-cpu-gomp wheels), or use conv_impl='xla'."
    )


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise OneDNNUnavailableError(
            "conv_impl='onednn' compiles its FFI handlers on first use and needs a C++17 "
            "compiler: none found ($CXX, g++, c++). Install one (e.g. Debian's g++) or use "
            "conv_impl='xla'."
        )
    return compiler


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("DIFFUSION_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "diffusion_jax")
    return pathlib.Path(root) / "onednn"


def _build(include: pathlib.Path, lib: pathlib.Path) -> pathlib.Path:
    """The compiled handlers, from the cache or built now (written under a temporary
    name and renamed, so a concurrent or interrupted build never leaves a torn file)."""
    source = _SOURCE.read_bytes()
    jax_include = pathlib.Path(jax.ffi.include_dir())
    digest = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(), str((lib / "libdnnl.so.3").resolve()).encode(),
    ])).hexdigest()[:16]
    target = _cache_dir() / f"djconv_{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = _compiler()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = pathlib.Path(tmp) / target.name
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(_SOURCE),
                   "-o", str(out), f"-I{include}", f"-I{jax_include}", f"-L{lib}", "-ldnnl",
                   f"-Wl,-rpath,{lib}"]
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
            if jax.default_backend() != "cpu":
                raise OneDNNUnavailableError(
                    f"conv_impl='onednn' runs on the CPU backend; the default backend is "
                    f"{jax.default_backend()!r}. Use conv_impl='xla'."
                )
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


def unavailable_reason() -> str | None:
    """None when oneDNN convolutions can be used here, else why not."""
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


def _call(kind: str, shape, a, b, strides, padding):
    # has_side_effect: XLA's partitioner would otherwise split the call over a sharded
    # batch with the wrong (global) shapes and return wrong values; marked as a side
    # effect, a sharded call is refused at compile time instead ("Side-effect ops cannot
    # be replicated"). It also keeps XLA from merging or dropping calls, so the backward
    # pass asks only for the gradients it needs (`conv_with_gradients`).
    return jax.ffi.ffi_call(FFI_TARGETS[kind], jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential", has_side_effect=True)(
        a, b, **_attributes(strides, padding))


def _forward(x, kernel, strides, padding):
    shape = _output_shape(x.shape, kernel.shape, strides, padding)
    return _call("forward", shape, x, kernel, strides, padding)


def _input_grad(x, kernel, dy, strides, padding):
    return _call("input_grad", x.shape, dy, kernel, strides, padding)


def _weight_grad(x, kernel, dy, strides, padding):
    return _call("weight_grad", kernel.shape, x, dy, strides, padding)


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
                         f"{kernel.dtype}. Use conv_impl='xla' for other dtypes.")
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
