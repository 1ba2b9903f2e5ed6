"""``python se_retrofit_with_noop.py finetune RECIPE ...`` is ``se-retrofit finetune RECIPE ...`` with the
``noop`` attention type of transfer_noop.py registered first.

``python se_retrofit_with_noop.py --many FILE`` runs one such command per line of FILE (a JSON list of
arguments) in this process, one after the other, through the same ``main`` (no interpreter start and
import per run), and prints ``DONE <seconds> <exit code> <line number>`` after each.

Why a launcher: a recipe naming a user-registered type (``retrofit: {attention: noop,
attention_module: transfer_noop}``) is refused unless the module is imported ("pass trust_code=True
(command line: --import transfer_noop)"), and ``se-retrofit finetune`` has no ``--import`` option
(``se-retrofit --import M finetune ...`` reads ``finetune`` as a model name). Importing the module
before the product's own ``main`` is what ``--import`` would do.
"""
import json
import sys
import time

import transfer_noop  # noqa: F401  (registers "noop")
from se_retrofit.cli import main


def many(path: str) -> int:
    with open(path) as f:
        commands = [json.loads(line) for line in f if line.strip()]
    for number, argv in enumerate(commands):
        began = time.perf_counter()
        code = main(argv)
        print(f"DONE {time.perf_counter() - began:.2f} {code} {number}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(many(sys.argv[2]) if sys.argv[1:2] == ["--many"] else main())
