"""``launch.py`` with a write fault injected below the project's code, where Orbax's own
background thread meets it: TensorStore's serialization of the arrays of one checkpoint
step raises as TensorStore does on a full disk.

  python tests/fault_launch.py STEP launch.py-flags...

Only the save of step STEP fails (every save with STEP = -1); the thread it failed in is
printed to stderr.
"""

import json
import os
import runpy
import sys
import threading

from orbax.checkpoint._src.serialization import serialization

FAIL_STEP = int(sys.argv.pop(1))
_real = serialization.async_serialize_from_host


async def _failing(rslices, tensorstore_spec, **kwargs):
    target = "" if FAIL_STEP < 0 else f"/{FAIL_STEP}"
    if f"{target}.orbax-checkpoint-tmp" in json.dumps(tensorstore_spec):
        print(f"fault injected in thread {threading.current_thread().name!r}",
              file=sys.stderr, flush=True)
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on "
                         "device [injected]")
    return await _real(rslices, tensorstore_spec, **kwargs)


serialization.async_serialize_from_host = _failing
launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")
sys.argv[0] = launch
runpy.run_path(launch, run_name="__main__")
