"""``python finetune_many.py`` runs ``se-retrofit`` commands read from stdin, one JSON list of
arguments a line (``["finetune", RECIPE, "--data", DIR, ..., "--import", "transfer_noop"]``), one
after the other in this process through the product's own ``main`` (no interpreter start and no
torch/timm import per run), and prints ``DONE <seconds> <exit code> <CPU seconds>`` after each (the
CPU time of this process during the run: about what the run takes on an idle core, whatever the load). The caller hands
out the next command when one is done, so several of these share a queue of runs.

The no-op attention type of the plain arms comes in through the command's own ``--import
transfer_noop``, as a user's registered type would.
"""
import json
import sys
import time

from se_retrofit.cli import main


def serve() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        began, cpu = time.perf_counter(), time.process_time()
        code = main(json.loads(line))
        print(f"DONE {time.perf_counter() - began:.2f} {code} {time.process_time() - cpu:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
