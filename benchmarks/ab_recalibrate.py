"""One side of an A/B of ``recalibrate(model)``: time it in this process, on whatever ``nvfp4_qat``
``PYTHONPATH`` gives, and print one line (median, min, quartiles of 21 calls after 3 warm-ups).

The model is ``bench_recalibration.py``'s (the 224 linear weights of Llama-3-8B, bf16, one GPU).
The lent GPU machines' hosts differ a lot from one machine to the next and drift within one, so a
comparison is only fair between fresh processes that alternate in one device call; session 11 ran,
with the previous code's ``src/`` unpacked at ``BASE`` (``git archive <rev> src | tar -x -C BASE``)
and the working tree installed at ``NEW``::

    for r in 1 2 3; do
      PYTHONPATH=BASE/src python3 benchmarks/ab_recalibrate.py base
      PYTHONPATH=NEW python3 benchmarks/ab_recalibrate.py new
      SWEEP_STREAMS=1 PYTHONPATH=NEW python3 benchmarks/ab_recalibrate.py new-1stream
    done

``AB_CALLS`` sets the number of timed calls (default 21) and ``AB_TRACE=1`` also prints them in
order. Knobs (environment, applied to the code under test before the model is built):
``SWEEP_STREAMS`` (the fused path's streams, ``_execute.SWEEP_STREAMS``) and ``STATS_TILES`` (the
stats pass's ``TILES``). Session 11 also had ``FIRST_CHUNK`` (a first stats launch of fewer tasks, a
setting since removed: no effect) and, for the 995686a tree, ``STATS_MAIN`` (its stats chunks kept on
the caller's stream, as the final code does). Run from the repository root on a GPU machine.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_recalibration import LLAMA3_8B, build_model, wall_times  # noqa: E402
from nvfp4_qat import recalibrate  # noqa: E402
from nvfp4_qat.kernels import fake_quant  # noqa: E402
from nvfp4_qat.recalibration import _execute  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    label = sys.argv[1] if len(sys.argv) > 1 else "run"
    if os.environ.get("SWEEP_STREAMS"):
        _execute.SWEEP_STREAMS = int(os.environ["SWEEP_STREAMS"])
    if os.environ.get("STATS_TILES"):
        fake_quant.STATS_CONFIG = dict(fake_quant.STATS_CONFIG, TILES=int(os.environ["STATS_TILES"]))
    device = torch.device("cuda")
    model = build_model(LLAMA3_8B, 32, device)
    calls = int(os.environ.get("AB_CALLS", "21"))
    trace = [t * 1e3 for t in wall_times(lambda: recalibrate(model), device, calls, warmup=3)]
    walls = sorted(trace)
    print(
        f"{label:<14} median {statistics.median(walls):7.2f}  min {walls[0]:7.2f}  q1 {walls[calls // 4]:7.2f} "
        f"q3 {walls[3 * calls // 4]:7.2f}  from {_execute.__file__}",
        flush=True,
    )
    if os.environ.get("AB_TRACE"):  # the calls in order: a drift within the process shows here
        print("  in order:", " ".join(f"{t:.1f}" for t in trace), flush=True)


if __name__ == "__main__":
    main()
