"""The run's report: fractions of the run's best peak, and markdown tables.

`finalize_fractions` divides every case's FLOP/s by the best matmul peak of the whole run
for its dtype and device count; `markdown_table` writes the cases as the tables of the
README's Performance section (the cases, the bare convolutions with PyTorch's beside
them where the run has both, the op time of the traced train steps by kind).
"""

from __future__ import annotations

from typing import Any

from .conv import CONV_KINDS, JAX_CONV_KINDS
from .op_profile import OP_KINDS
from .timing import best_peak
from .torch_side import conv_key


def finalize_fractions(cases: list[dict[str, Any]], peaks: dict) -> None:
    """Every case's fractions over the best peak of the whole run for its dtype and
    device count (a peak measured after a case may be higher than those before it)."""
    for case in cases:
        if "model_flops_per_s" not in case or case.get("case") == "conv":
            continue
        dtype = case.get("dtype", "float32")
        peak = best_peak(peaks, dtype, case.get("devices", 1))
        if not peak:
            continue
        case["peak_flops_per_s"] = peak
        case["fraction_of_peak"] = case["model_flops_per_s"] / peak
        if "ddpm_flops_per_s" in case:  # the U-Net cases
            case["ddpm_fraction_of_peak"] = case["ddpm_flops_per_s"] / peak
    for case in cases:  # the bare convolutions' kernels
        if case.get("case") != "conv" or not best_peak(peaks, "float32"):
            continue
        for key in [k for k in case if k.endswith("_fraction_of_peak")]:
            kind = key[: -len("_fraction_of_peak")]
            case[key] = case[f"{kind}_flops_per_s"] / best_peak(peaks, "float32")


def _impl_label(case: dict[str, Any]) -> str:
    kernels = case.get("cpu_kernels", "none")
    return "" if kernels == "none" else f", cpu_kernels={kernels}"


def _fid_label(case: dict[str, Any]) -> str:
    vs = case.get("vs_torch")
    return (f"FID features, Inception, {case.get('image_size')} -> {case.get('input_size')}"
            + ("" if vs is None else f", {vs:.2f}x PyTorch"))


def _train_label(case: dict[str, Any]) -> str:
    return f"train step, {case.get('model')} U-Net, {case.get('dtype')}{_impl_label(case)}"


def markdown_table(result: dict[str, Any]) -> str:
    """The cases of a result as markdown tables (the README's Performance section): the
    cases, then the bare convolutions (JAX and PyTorch side by side where the run has
    both), then the op profile of the train steps."""
    header = ["| case | batch | devices | compile s | s / call | images/s | GFLOP / call "
            "(DDPM count) | GFLOP/s | of peak (DDPM count) | host RSS GB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for c in result["cases"]:
        if c["case"] == "conv":
            continue
        name = {"train_step": _train_label(c),
                "sample": f"sample, {c.get('sampler')}, {c.get('network_evals')} evaluations"
                          f"{_impl_label(c)}",
                "bpd": f"bound, T = {c.get('num_timesteps')}{_impl_label(c)}",
                "ode_bpd": f"ODE bits/dim, T = {c.get('num_timesteps')}, rtol {c.get('rtol')}"
                           f", NFE {c.get('nfe_mean', 0):.0f} per image",
                "fid": _fid_label(c),
                "data": f"input pipeline, prefetch {c.get('prefetch')}",
                "train_loop": f"train loop, {c.get('model')} U-Net{_impl_label(c)}, input "
                              f"wait {100 * (c.get('data_wait_fraction') or 0):.2f} %"}[c["case"]]

        def fmt(key, scale=1.0, digits=1):
            value = c.get(key)
            return "" if value is None else f"{value / scale:.{digits}f}"

        flops = fmt("model_flops", 1e9, 0) + (
            f" ({fmt('ddpm_flops', 1e9, 0)})" if "ddpm_flops" in c else "")
        fraction = "" if "fraction_of_peak" not in c else (
            f"{fmt('fraction_of_peak', 0.01, 0)} %" + (
                f" ({fmt('ddpm_fraction_of_peak', 0.01, 0)} %)"
                if "ddpm_fraction_of_peak" in c else ""))
        rss = c.get("memory", {}).get("host_peak_rss_bytes")
        cells = [name, str(c.get("batch", "")), str(c.get("devices") or ""), fmt("compile_s"),
                 fmt("step_s", digits=3), fmt("images_per_s", digits=2), flops,
                 fmt("model_flops_per_s", 1e9, 0), fraction,
                 "" if rss is None else f"{rss / 1e9:.1f}",
                 str((c.get("load_average") or [""])[0])]
        rows.append("| " + " | ".join(cells) + " |")
    torch_result = result.get("torch")
    for c in (torch_result or {}).get("cases", []):
        name = (f"train step, {c['model']} U-Net, {c['dtype']}, PyTorch {torch_result['torch']}"
                f" + diffusers {torch_result['diffusers']} ({torch_result['threads']} threads)")
        cells = [name, str(c["batch"]), "", "", f"{c['step_s']:.3f}",
                 f"{c['images_per_s']:.2f}", "", "", "", "", ""]
        rows.append("| " + " | ".join(cells) + " |")
    for c in (torch_result or {}).get("fid_cases", []):
        if c.get("skipped"):
            cells = [f"FID features, pytorch-fid: skipped ({c['skipped']})",
                     str(c["batch"])] + [""] * 9
        else:
            name = (f"FID features, pytorch-fid {c['pytorch_fid']} Inception, "
                    f"{c['image_size']} -> 299, PyTorch {torch_result['torch']} "
                    f"({torch_result['threads']} threads)")
            cells = [name, str(c["batch"]), "", "", f"{c['step_s']:.3f}",
                     f"{c['images_per_s']:.2f}", "", "", "", "", ""]
        rows.append("| " + " | ".join(cells) + " |")
    sections = [header + rows if rows else [], _conv_table(result)]
    profiled = [c for c in result["cases"] if c.get("profile", {}).get("kinds")]
    if profiled:
        rows = ["Op time of one traced train step by kind (share of the summed op time; "
                "GFLOP/s of convolutions and matmuls):", "",
                "| case | devices | " + " | ".join(OP_KINDS) + " |",
                "|---|---|" + "---|" * len(OP_KINDS)]
        for c in profiled:
            kinds = c["profile"]["kinds"]
            cells = [_train_label(c), str(c["devices"])]
            for kind in OP_KINDS:
                k = kinds.get(kind)
                rate = f" ({k['gflop_per_s']:.0f})" if k and k.get("gflop_per_s") else ""
                cells.append("" if k is None else f"{100 * k['share']:.1f} %{rate}")
            rows.append("| " + " | ".join(cells) + " |")
        sections.append(rows)
    return "\n\n".join("\n".join(section) for section in sections if section)


def _conv_table(result: dict[str, Any]) -> list[str]:
    convs = [c for c in result["cases"] if c["case"] == "conv"]
    if not convs:
        return []
    torch_result = result.get("torch") or {}
    by_shape = {conv_key(c): c for c in torch_result.get("conv_cases", [])}
    with_torch = any(conv_key(c) in by_shape for c in convs)
    header = ("| 3x3 convolution, float32 | batch | forward | input grad | weight grad | "
              "weight grad, dilated |")
    if with_torch:
        header += (f" PyTorch {torch_result['torch']} ({torch_result['threads']} threads, "
                   "NCHW): forward | input grad | weight grad |")
    rows = ["Bare 3x3 convolution, GFLOP/s of each kernel alone (one device):", "",
            header, "|---|---|---|---|---|---|" + ("---|---|---|" if with_torch else "")]
    for c in convs:
        cells = [f"{c['side']}x{c['side']}, {c['in_ch']} -> {c['out_ch']} channels",
                 str(c["batch"])]
        cells += ["" if c.get(f"{kind}_flops_per_s") is None
                  else f"{c[f'{kind}_flops_per_s'] / 1e9:.0f}" for kind in JAX_CONV_KINDS]
        if with_torch:
            theirs = by_shape.get(conv_key(c))
            cells += ["" if theirs is None else f"{theirs[f'{kind}_flops_per_s'] / 1e9:.0f}"
                      for kind in CONV_KINDS]
        rows.append("| " + " | ".join(cells) + " |")
    return rows
