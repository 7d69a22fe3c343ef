"""Where a step's time goes: the ops of a profiler trace, summed by kind.

`profile_step` traces one call with JAX's profiler and `op_time_by_kind` sums the time of
the compiled program's ops in the trace by kind (`OP_KINDS`: convolution forward, input
gradient and weight gradient, matmul, reduction, collective, data movement, the rest),
with the FLOPs of the convolutions and matmuls.

On the CPU backend an op's trace event carries the names of the op and of its program
(``hlo_op``, ``hlo_module``) with run and device ids, and nothing about the op itself: no
opcode, shapes, category or FLOPs (the trace's metadata holds no HLO module either), and
XLA's cost analysis gives one total per program. So `classify_op` reads each op from the
compiled program's HLO text: the instructions of a fusion, a convolution's window and
dimension labels (which tell a weight gradient from a forward pass), operand shapes for
the FLOPs. This module is the only one that parses HLO text.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pathlib
import re
import time
from typing import Any, Callable

import jax

from .flops import ONEDNN_CONV_PASSES, onednn_pass_flops

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
# Computations an instruction runs: fusions (calls=), loops (body=, condition=), reductions
# (to_apply=), conditionals (branch_computations={...}).
_CALLED = re.compile(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)|"
                     r"branch_computations=\{([^}]*)\}")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")
OP_KINDS = ("conv forward", "conv input grad", "conv weight grad", "matmul", "reduction",
            "collective", "data movement", "elementwise/other")
# Ops that only move data (a fusion of these and of reshapes is "data movement").
_MOVES = {"copy", "transpose", "reverse", "concatenate", "pad", "slice", "dynamic-slice",
          "dynamic-update-slice"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "ragged-all-to-all")
# Ops whose own trace event encloses the events of the ops they run: not counted.
CONTAINERS = ("while", "call", "conditional")


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Instruction name -> its text, computation name -> its instructions' names."""
    instrs: dict[str, str] = {}
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[current] = []
            continue
        match = _INSTR.match(line)
        if match and current is not None:
            instrs[match.group(1)] = match.group(2)
            comps[current].append(match.group(1))
    return instrs, comps


def _opcode(instr_text: str) -> str:
    """The opcode of an instruction's text (what follows ``%name = ``), '' if none."""
    match = re.search(r"\s([\w\-]+)\(", " " + instr_text)
    return match.group(1) if match else ""


def _dims(shape_text: str) -> list[int] | None:
    match = _SHAPE.match(shape_text)
    return None if match is None else [int(d) for d in match.group(1).split(",") if d]


def _operand_dims(line: str, opcode: str, index: int, instrs: dict[str, str]):
    """Dims of the ``index``-th operand of ``opcode(...)`` in ``line``: printed before the
    operand's name in some HLO texts (``f32[2,3]{1,0} %a``), looked up otherwise."""
    args = line.split(f"{opcode}(", 1)[1]
    operands = re.findall(r"((?:\w+\[[\d,]*\](?:\{[^}]*\})?\s+)?)%([\w.\-]+)", args)
    if len(operands) <= index:
        return None
    printed, name = operands[index]
    return _dims(printed.strip()) if printed else _dims(instrs.get(name, ""))


def _conv(line: str, opcode: str, instrs: dict[str, str]):
    """(kind, FLOPs) of a convolution: 2 x output elements x window x input features per
    group. A weight gradient is a convolution whose window is larger than its output (XLA
    writes dL/dW as a convolution of the input by dL/dy over the whole image); an input
    gradient has ``transpose`` in its JAX op name. (For images smaller than the kernel the
    two gradients cannot be told apart this way.)"""
    out = _dims(line)
    window = re.search(r"window=\{size=([\dx]+)", line)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    size = [int(d) for d in window.group(1).split("x")] if window else [1]
    lhs = _operand_dims(line, opcode, 0, instrs)
    flops, spatial = None, None
    if out and labels:
        out_labels = labels.group(3)
        spatial = math.prod(out[i] for i, c in enumerate(out_labels) if c.isdigit())
        if lhs and len(lhs) == len(labels.group(1)):
            groups = re.search(r"(?:feature|batch)_group_count=(\d+)", line)
            feature = lhs[labels.group(1).index("f")]
            flops = 2.0 * math.prod(out) * math.prod(size) * feature / (
                int(groups.group(1)) if groups else 1)
    if spatial is not None and math.prod(size) > spatial:
        return "conv weight grad", flops
    return ("conv input grad" if "transpose(" in line else "conv forward"), flops


def _onednn_conv_op(line: str, kind: str, instrs: dict[str, str]):
    """(kind, FLOPs) of one of `diffusion_jax.models.onednn`'s FFI calls, counted as
    `flops.model_flops` counts them in the jaxpr."""
    dims = [_operand_dims(line, "custom-call", i, instrs) for i in (0, 1)] + [_dims(line)]
    flops = onednn_pass_flops(kind, *dims)
    label = {"forward": "conv forward", "input_grad": "conv input grad",
             "weight_grad": "conv weight grad"}[kind]
    return label, flops


def _dot_flops(line: str, instrs: dict[str, str]):
    out = _dims(line)
    lhs = _operand_dims(line, "dot", 0, instrs)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if out is None or not lhs or not contracting:
        return None
    dims = [int(d) for d in contracting.group(1).split(",") if d]
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in dims)


def classify_op(name: str, instrs: dict[str, str], comps: dict[str, list[str]]):
    """(kind, FLOPs or None) of the compiled program's op ``name``, judged with the
    instructions it calls (a fusion's): a convolution (`_conv`; also oneDNN's, and cuDNN's
    forward / backward-input / backward-filter calls on a GPU), a matmul (``dot``, cuBLAS,
    oneDNN), a reduction, a collective (all-reduce, all-gather, ...), data movement
    (copies, transposes, concatenation, padding, slicing), or the rest (elementwise
    fusions and small ops). Loops and calls (`CONTAINERS`) are None: their trace events
    enclose those of the ops they run."""
    text = instrs.get(name, "")
    if _opcode(text) in CONTAINERS:
        return None, None
    body, stack, seen = [text], [text], set()
    while stack:
        for single, branches in _CALLED.findall(stack.pop()):
            for comp in [single] if single else re.findall(r"%([\w.\-]+)", branches):
                if comp not in seen:
                    seen.add(comp)
                    inner = [instrs[i] for i in comps.get(comp, [])]
                    body += inner
                    stack += inner
    coded = [(_opcode(line), line) for line in body]
    for op, line in coded:
        if op == "convolution":
            return _conv(line, op, instrs)
        target = re.search(r'custom_call_target="(\w+)"', line) if op == "custom-call" else None
        if target and target.group(1) in ONEDNN_CONV_PASSES:
            return _onednn_conv_op(line, ONEDNN_CONV_PASSES[target.group(1)], instrs)
        if op == "custom-call" and re.search(r"cudnn\$conv|onednn\$convolution", line):
            if "BackwardFilter" in line:
                return "conv weight grad", None
            if "BackwardInput" in line:
                return "conv input grad", None
            if "cudnn$conv" in line:
                return "conv forward", None
            return _conv(line, op, instrs)
    for op, line in coded:
        if op == "dot":
            return "matmul", _dot_flops(line, instrs)
        if op == "custom-call" and re.search(r"cublas|gemm|onednn\$matmul", line):
            return "matmul", None
    ops = {op for op, _ in coded} - {""}
    if any(op.startswith(_COLLECTIVES) for op in ops):
        return "collective", None
    if ops & {"reduce", "reduce-window"}:
        return "reduction", None
    if ops & _MOVES and ops <= _MOVES | {"bitcast", "parameter", "reshape", "broadcast",
                                         "constant", "fusion", "tuple", "get-tuple-element"}:
        return "data movement", None
    return "elementwise/other", None


def profile_step(run_step: Callable[[], Any], hlo_text: str, log_dir: str) -> dict[str, Any]:
    """Traces one call of ``run_step`` (JAX's profiler, into ``log_dir``), writes the
    program beside the trace and returns `op_time_by_kind` of it, with the traced call's
    wall time."""
    jax.block_until_ready(run_step())  # nothing pending when the trace starts
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        jax.block_until_ready(run_step())
        wall = time.perf_counter() - start
    traces = sorted(pathlib.Path(log_dir).rglob("*.trace.json.gz"), key=os.path.getmtime)
    if not traces:
        raise RuntimeError(f"the profiler wrote no *.trace.json.gz under {log_dir}")
    # The program beside its trace (a new timestamped folder per trace): op names resolve,
    # and `op_time_by_kind` can be run on the pair later.
    (traces[-1].parent / "program.hlo.txt").write_text(hlo_text)
    return {"traced_step_s": wall, "trace_dir": str(traces[-1].parent),
            **op_time_by_kind(traces[-1], hlo_text)}


def op_time_by_kind(trace_file: str | os.PathLike, hlo_text: str) -> dict[str, Any]:
    """The time of a compiled program's ops in a profiler trace (``*.trace.json.gz``),
    summed by kind (`classify_op`): milliseconds, share of the summed op time, op count,
    GFLOP and GFLOP/s of convolutions and matmuls. Ops that run at the same time (on
    several threads or streams, or on several devices) are each counted in full, so the
    sum can exceed the step's wall time: the shares say where the work goes, not a
    critical path. On a mesh of several devices every device's ops are counted (replicated
    work once per device)."""
    instrs, comps = parse_hlo(hlo_text)
    module = re.search(r"^HloModule ([\w.\-]+)", hlo_text, re.M)
    module_name = module.group(1) if module else None
    events = json.loads(gzip.decompress(pathlib.Path(trace_file).read_bytes()))["traceEvents"]
    kinds = {k: {"ms": 0.0, "ops": 0, "flops": 0.0} for k in OP_KINDS}
    classified: dict[str, tuple] = {}  # an op runs once per device and per loop trip
    for event in events:
        args = event.get("args") or {}
        name = args.get("hlo_op")
        if event.get("ph") != "X" or name is None or name not in instrs:
            continue
        if module_name and args.get("hlo_module") not in (None, module_name):
            continue
        if name not in classified:
            classified[name] = classify_op(name, instrs, comps)
        kind, flops = classified[name]
        if kind is None:
            continue
        kinds[kind]["ms"] += event.get("dur", 0.0) / 1e3
        kinds[kind]["ops"] += 1
        kinds[kind]["flops"] += flops or 0.0
    total = sum(k["ms"] for k in kinds.values())
    if total == 0:
        raise RuntimeError(f"no op of the program {module_name} in the trace {trace_file}")
    return {
        "op_ms_total": total,
        "kinds": {name: {"ms": k["ms"], "share": k["ms"] / total, "ops": k["ops"],
                         "gflop": k["flops"] / 1e9 if k["flops"] else None,
                         "gflop_per_s": (k["flops"] / k["ms"] / 1e6) if k["flops"] else None}
                  for name, k in kinds.items() if k["ops"]},
    }
