"""The README's quick start, as a new user runs it: the main-job line read from README.md
and run from a fresh directory holding a copy of the repository (its relative workdir as
written), with only the step counts shortened."""

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from helpers import ROOT, launch_env

# The only flags a test may append to the README's command: they shorten the run (the
# grid's sampler takes 50 of the 1,000 steps, and the digits FID only the grid's 100).
SHORTEN = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2",
           "--config.train.sample_every=4", "--config.sample.num_steps=50",
           "--config.fid.num_samples=100"]


def _quick_start_lines():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def _tracked_files():
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    return [p for p in proc.stdout.decode().split("\0") if p]


def test_the_quick_start_commands_install_what_they_name():
    main, tests = _quick_start_lines()
    assert "pip install -e ." in main and 'pip install -e ".[test]"' in tests
    assert "test = [" in (ROOT / "pyproject.toml").read_text()
    assert tests.endswith("python -m pytest -q")


@pytest.mark.slow  # the digits U-Net's compile and a 50-step grid of 100 samples
def test_the_quick_start_main_job_runs_as_written_from_a_fresh_copy(tmp_path):
    main, _ = _quick_start_lines()
    job = [part.strip() for part in main.split("&&") if "launch.py" in part]
    assert len(job) == 1, main
    argv = shlex.split(job[0])
    assert argv[:2] == ["python", "launch.py"], job[0]
    workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
    assert not pathlib.Path(workdir).is_absolute()  # the case that once lost every checkpoint

    clone = tmp_path / "clone"
    for name in _tracked_files():
        target = clone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    proc = subprocess.run([sys.executable, *argv[1:], *SHORTEN], cwd=clone, env=launch_env(1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = clone / workdir
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    grid = run / "samples" / "ema_samples_00000004.png"
    with Image.open(grid) as image:
        image.load()
        # 100 digits of 8x8 enlarged 4x, 10 per row, 1-pixel separators.
        assert image.size == (10 * 33 + 1, 10 * 33 + 1)
