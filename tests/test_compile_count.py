"""No retracing in the hot loops: the train step is traced and compiled once per run, and
the sampling loops and the bound once per shape, whatever the parameters and keys.

A retrace costs a full XLA compile (minutes for the CIFAR-10 U-Net), so a change that
makes one of these functions retrace every step (a Python value that changes, a new
function object per call, a sharding that drifts) must fail here.
"""

import json
import logging

import jax
import jax.numpy as jnp
import pytest
from jax.tree_util import Partial

from diffusion_jax import likelihood, sampling, schedules
from diffusion_jax.training import step as step_lib, train

from helpers import toy_config


@pytest.fixture
def count_train_step_traces(monkeypatch):
    """Wraps `make_train_step` so that every trace of the step it builds is recorded."""
    traces = []
    make = step_lib.make_train_step

    def counting_make_train_step(**kwargs):
        step = make(**kwargs)

        def train_step(state, batch):
            traces.append(1)  # runs only while tracing
            return step(state, batch)

        return train_step

    monkeypatch.setattr(step_lib, "make_train_step", counting_make_train_step)
    return traces


def _compiles_of(records, name):
    """Lowerings of ``jit(name)`` that `jax.log_compiles` reported (one per compile)."""
    return [r for r in records if r.getMessage().startswith(f"Compiling jit({name}) ")]


def test_train_loop_traces_and_compiles_the_step_once(count_train_step_traces, tmp_path, caplog):
    config = toy_config()  # 6 steps: log steps at 2, 4, 6; checkpoints at 3 and 6
    caplog.set_level(logging.WARNING, logger="jax._src.interpreters.pxla")
    with jax.log_compiles(True):
        state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 6
    assert count_train_step_traces == [1]
    assert len(_compiles_of(caplog.records, "train_step")) == 1

    # Resumed from the checkpoint of step 6 to step 9: again one trace, one compile.
    caplog.clear()
    count_train_step_traces.clear()
    config.train.num_steps = 9
    with jax.log_compiles(True):
        state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 9
    assert count_train_step_traces == [1]
    assert len(_compiles_of(caplog.records, "train_step")) == 1

    # Log steps (2, 4, 6, then 8, 9) report how much of the time the loop waited for input.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    waits = [line["data_wait_fraction"] for line in lines]
    assert len(waits) == 5 and all(0.0 <= w <= 1.0 for w in waits)


def test_compile_count_helpers_can_fail(tmp_path, caplog):
    """The counters above do see a retrace: a step jitted with a Python int argument that
    changes recompiles, and both the log and a trace counter record it."""
    traces = []

    def step(x, scale):
        traces.append(1)
        return x * scale

    jitted = jax.jit(step, static_argnums=1)
    caplog.set_level(logging.WARNING, logger="jax._src.interpreters.pxla")
    with jax.log_compiles(True):
        for scale in (1, 2, 3):
            jitted(jnp.ones(3), scale)
    assert len(traces) == 3
    assert len(_compiles_of(caplog.records, "step")) == 3


# --- sampling loops and the bound -----------------------------------------------------------


T = 50
SHAPE = (4, 2, 2, 3)


def _counting_model():
    """``apply(params, x, t)`` that records each trace; one function object for all calls,
    as `jax.tree_util.Partial(apply, params)` needs for the compiled loops to be reused."""
    traces = []

    def apply(params, x, t):
        traces.append(1)
        return jnp.tanh(x * params["w"]) + params["b"] * t[:, None, None, None] / T

    return apply, traces


def _params(seed):
    key_w, key_b = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(key_w, ()), "b": jax.random.normal(key_b, ())}


@pytest.mark.parametrize(
    "sampler,num_steps", [("ancestral", None), ("ancestral", 10), ("ddim", 10),
                          ("dpm_solver++", 10)]
)
def test_sampling_loop_traces_once_for_new_params_and_keys(sampler, num_steps):
    schedule = schedules.get_schedule("cosine", T)
    apply, traces = _counting_model()
    outputs = []
    for seed in range(3):
        model_fn = Partial(apply, _params(seed))
        outputs.append(sampling.sample(
            schedule, model_fn, SHAPE, sampler=sampler, key=jax.random.key(seed),
            num_steps=num_steps, mean_type="eps", var_type="fixed_large",
        ))
        if seed == 0:
            first = len(traces)
    assert first >= 1
    assert len(traces) == first, f"{sampler} retraced the model: {len(traces)} > {first}"
    # New parameters and keys did reach the compiled loop.
    assert float(jnp.max(jnp.abs(outputs[0] - outputs[1]))) > 1e-3


def test_bound_loop_traces_once_for_new_params_and_data():
    schedule = schedules.get_schedule("cosine", T)
    apply, traces = _counting_model()
    totals = []
    for seed in range(3):
        x = jax.random.uniform(jax.random.key(10 + seed), SHAPE, minval=-1.0, maxval=1.0)
        out = likelihood.calc_bpd_loop(
            schedule, Partial(apply, _params(seed)), x, key=jax.random.key(seed),
            mean_type="eps", var_type="fixed_large",
        )
        totals.append(out["total_bpd"])
        if seed == 0:
            first = len(traces)
    assert first >= 1 and len(traces) == first
    assert float(jnp.max(jnp.abs(totals[0] - totals[1]))) > 1e-3


def test_training_sample_grids_compile_the_sampler_once(tmp_path, monkeypatch):
    """Grids at steps 2, 4 and 6, each of 10 samples drawn in batches of 8 (two calls):
    the sampler is traced once for the whole run."""
    import dataclasses

    from diffusion_jax.training import objectives

    from helpers import one_level_cifar_config

    traces = []
    create = objectives.create_objective

    def counting_create(config, info):
        objective = create(config, info)

        def sample(params, key, num):
            traces.append(num)  # runs only while tracing
            return objective.sample(params, key, num)

        return dataclasses.replace(objective, sample=sample)

    monkeypatch.setattr(objectives, "create_objective", counting_create)
    config = one_level_cifar_config()
    config.train.num_steps, config.train.sample_every = 6, 2
    config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 5, 10, 8
    train.train_and_evaluate(config, tmp_path)
    assert traces == [8]
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == [f"ema_samples_0000000{s}.png" for s in (2, 4, 6)]
