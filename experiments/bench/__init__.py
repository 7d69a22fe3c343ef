"""The pieces of the throughput benchmark `experiments/benchmark.py`: `timing` (timed
calls, compile time, the matmul peak, memory, the environment), `flops` (XLA's cost
analysis, the jaxpr's count, the rates) and `op_profile` (a profiler trace's op time by
kind)."""
