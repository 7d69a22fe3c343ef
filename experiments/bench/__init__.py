"""Throughput benchmark: train steps, samplers, the full bound, FID features and the input
pipeline.

Prints one JSON object and writes it to ``--out``. It reports the device (platform, kind,
count), the JAX version, the machine's measured peak (a large matmul in each precision,
timed in the same run, and again next to each train case, because other work on a shared
machine moves it) and, per case:

- ``compile_s``: trace + lower + compile of the case's jitted function;
- ``step_s``: the median of ``--steps`` timed calls after warm-up, each ended with
  ``block_until_ready`` (``step_s_all`` lists them);
- ``images_per_s``;
- ``xla_flops``: FLOPs of one call from XLA's cost analysis of the compiled program
  (every op, elementwise included; given for the loop-free train step on one device only,
  as XLA counts a loop body once and a partitioned program per device);
- ``model_flops``: 2 x the multiply-adds of every convolution and matmul the program runs,
  counted from its jaxpr with loops multiplied out, and ``ddpm_flops``: the same for
  DDPM's network as written, whose upsampling convolves the 2x-upsampled image (our
  `unet.Upsample` does the same arithmetic per output phase with 16/36 of the work); the
  convention of published figures;
- ``model_flops_per_s``, ``ddpm_flops_per_s`` and ``fraction_of_peak``,
  ``ddpm_fraction_of_peak``: per second, and over ``peak_flops_per_s``, the best matmul
  FLOP/s of the run in the case's precision on the case's devices (``peak_how`` in the
  JSON: several sizes and repetitions, all devices at once for data-parallel cases);
- ``memory``: the compiled program's argument/output/temporary bytes (XLA's memory
  analysis), the device's peak bytes in use where the backend reports it (GPU, TPU), and
  the process's peak resident set size (host RAM);
- train steps also: ``devices`` (mesh size), ``cores_busy`` (process CPU seconds per wall
  second), ``traces`` (1 = no retracing), ``state_donated``.

Cases (``--cases``, comma-separated):

- ``train``: the train step (loss, gradient, Adam, EMA) of ``--train-models`` (``cifar``:
  the DDPM CIFAR-10 U-Net, 35.7M parameters; ``small``: ch 64, ch_mult (1, 2, 2), one
  residual block, attention at 8x8, 4.4M) in each of ``--dtypes`` (``bfloat16``: bfloat16
  compute, float32 parameters and optimizer state), on a mesh of one device and/or of all
  devices (``--meshes``);
- ``conv``: a bare 3x3 convolution (stride 1, SAME padding, NHWC, float32) at each
  level of ``--conv-model``'s U-Net (the CIFAR one: 32x32 with 128 channels in and out,
  then 16x16, 8x8 and 4x4 with 256), batch ``--conv-batch``, on one device: its forward
  pass, its input gradient and its weight gradient (as XLA writes it, and in the dilated
  form of `diffusion_jax.models.conv`, ``weight_grad_dilated``), each jitted alone, with
  GFLOP/s (2 x B x H x W x 9 x C_in x C_out each) and the fraction of the matmul peak; the
  kernels a train step spends most of its time in, without the network around them;
- ``sample``: ancestral, DDIM and DPM-Solver++ with ``--sample-steps`` network
  evaluations each, one compiled loop per sampler; images/s and network evaluations x
  images per second;
- ``bpd``: `likelihood.calc_bpd_loop`, every term of the bound over ``--bpd-timesteps``
  steps (the full T = 1000 by default) in one compiled loop;
- ``ode_bpd``: `likelihood.ode_bpd`, bits/dim under the probability-flow ODE of the eval
  model read as a score model through its DDPM schedule's VP SDE (Hutchinson divergence,
  one dequantization draw, Tsit5 with rtol = atol = ``--ode-tol``), one compiled solve
  per example, the batch split over every device; images/s and the network evaluations
  (NFE) per example;
- ``fid``: ``--mode=fid``'s feature extraction: `features.FeatureExtractor` on pytorch-fid's
  FID Inception in Flax (`diffusion_jax.metrics.inception`, random weights of its shapes),
  ``--fid-batch`` images of ``--fid-size`` squared resized to 299 inside the network, pool
  features and logits back on the host, the batch split over every local device; compile
  and first-call seconds, images/s, FLOPs per image (``model_flops_per_image``, and
  ``xla_flops_per_image`` from XLA's cost analysis of the per-device program times the
  device count) and the fraction of the float32 matmul peak on those devices;
- ``data``: the input pipeline alone (mocked CIFAR-10 through TFDS + grain, the same
  reader threads and batch function as training), images/s, with and without prefetch;
- ``loop``: ``train.train_and_evaluate`` itself on mocked CIFAR-10 with the ``small``
  model: the loop's images/s and the fraction of wall time spent waiting for input
  (``data_wait_fraction`` from its metrics).

On a CPU the backend shows one device per core by default (``--cpu-devices``), so the
train step is timed both on one device (XLA spreads each op over the cores) and data
parallel over the cores (one device per core, each running its share of the batch), the
setting ``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`` gives a training run.

Side by side with PyTorch in the same run: ``--torch-python=PATH`` names a Python
interpreter that has ``torch`` and ``diffusers`` (they are not dependencies of this
project; any environment will do). Before the JAX train cases, it runs
`experiments/benchmark_torch.py` with that interpreter on the same models (``cifar``,
``small``), batches and step counts, and on the same bare convolutions (``conv``; NCHW,
the layout of the PyTorch network), and on pytorch-fid's ``InceptionV3([3])`` at the
``fid`` case's batch and image size (random weights, nothing downloaded; reported as
skipped where that Python has no pytorch-fid); its cases go under ``torch`` in the JSON
(and as rows of the markdown tables), each float32 JAX train case and the ``fid`` case
get ``vs_torch``, their images/s over PyTorch's, and each ``conv`` case ``vs_torch`` per
kernel, its GFLOP/s over PyTorch's:

    python experiments/benchmark.py --cases=train --dtypes=float32 \
        --torch-python=/path/to/venv/bin/python --out=/tmp/side_by_side.json

Where the time goes: ``--profile-dir=DIR`` traces one more step of each train case with
JAX's profiler (a timestamped folder under ``DIR/train_<model>_<dtype>_<n>dev``, with the
compiled program beside it as ``program.hlo.txt``; open the trace in Perfetto or
TensorBoard) and adds ``profile`` to the case: the op time summed by kind (convolutions
forward, input gradient and weight gradient, matmuls, reductions, collectives, data
movement, the rest), each kind's share and, for convolutions and matmuls, GFLOP/s; the
markdown gets a second table. ``op_profile.op_time_by_kind(trace, program)`` sums a saved
trace again.

Batches are global, split over the devices of the mesh (multiples of the device count).
``--cpu-kernels`` sets the U-Net's ``model.cpu_kernels`` for the float32 cases: 'none'
(the default path, XLA's convolutions), or the opt-ins 'dilated' and 'onednn'
(`diffusion_jax.models.conv`; oneDNN on one device uses every core, on several each
device convolves its shard of the batch on its share of the cores); the rows that used
an opt-in say which. Set ``XLA_FLAGS`` in the
environment to try XLA options; the JSON records them.

The modules: `cli` (the command line of `experiments/benchmark.py` and the run's order),
`timing` (timed calls, compile time, the matmul peak, memory, the environment), `flops`
(XLA's cost analysis, the jaxpr's count, the rates), `models` (the U-Net sizes and their
configs), the cases in `train` (train step, input pipeline, train loop), `conv` (the bare
convolutions), `evaluation` (sampling, the bound, ODE bits/dim) and `fid` (the FID
features), `op_profile` (a
profiler trace's op time by kind), `torch_side` (running `experiments/benchmark_torch.py`
and the ``vs_torch`` ratios) and `report` (fractions of the run's peak, markdown tables).
"""
