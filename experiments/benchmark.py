"""Throughput benchmark: train steps, samplers, the full bound, FID features and the input
pipeline.

The command line of the `experiments/bench` package, whose docstring
(`experiments/bench/__init__.py`) describes the cases, the fields of the JSON and the
options. It prints one JSON object and writes it to ``--out`` (``--markdown``: the cases
as markdown tables).

Commands, from the repository root:

    python experiments/benchmark.py --out=/tmp/benchmark.json          # CPU: minutes
    python experiments/benchmark.py --quick --out=/tmp/quick.json      # smoke test
    python experiments/benchmark.py --cases=fid --fid-batch=32 \
        --torch-python=/path/to/venv/bin/python --out=/tmp/fid.json      # FID features
    python experiments/benchmark.py --train-batch=128 --small-batch=256 \
        --sample-batch=256 --bpd-batch=64 --data-batch=512 --eval-model=cifar \
        --dtypes=float32,bfloat16 --bf16-models=all --out=/tmp/gpu.json   # GPU / TPU
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from experiments.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
