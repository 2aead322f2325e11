"""Start-up cost: ``import nvfp4_qat``, ``import nvfp4_qat.format`` and ``nvfp4-qat --help``.

Each case runs ``--repeat`` times in a fresh interpreter; prints the median wall time and which
frameworks the import loaded. Run from the repository root (``PYTHONPATH=<other checkout>/src``
measures another version of the package with the same interpreter)::

    python benchmarks/bench_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    "import torch": "import torch",
    "import nvfp4_qat": "import nvfp4_qat",
    "import nvfp4_qat.format": "import nvfp4_qat.format",
    "nvfp4-qat --help": "import sys; sys.argv = ['nvfp4-qat', '--help']; from nvfp4_qat.cli import main; main()",
}
FRAMEWORKS = ("lightning", "torchmetrics", "hydra", "torch.distributed.tensor", "triton")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import torch

    print(f"python {platform.python_version()}, torch {torch.__version__}, cores {os.cpu_count()}")
    print(f"load average {os.getloadavg()}, PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    for name, code in CASES.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        probe = f"{code.split(';')[0] if 'argv' not in code else 'import nvfp4_qat.cli'}\nimport sys\n"
        probe += f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])"
        loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
        print(f"{name:<26} median {statistics.median(times):6.2f} s  loads {loaded.stdout.strip()}")


if __name__ == "__main__":
    main()
