"""The pieces of the throughput benchmark `experiments/benchmark.py`: `timing` (timed
calls, compile time, the matmul peak, memory, the environment), `flops` (XLA's cost
analysis, the jaxpr's count, the rates), `op_profile` (a profiler trace's op time by
kind), `models` (the U-Net sizes and their configs) and the cases: `train` (train step,
input pipeline, train loop), `conv` (the bare convolutions) and `evaluation` (sampling,
the bound, ODE bits/dim)."""
