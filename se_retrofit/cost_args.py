"""The command line's cost options, ``--budget``, ``--measure`` and ``--repeats``, kept apart from
:mod:`se_retrofit.cost_cli` (which applies them) so that building the parser imports no torch:
``se-retrofit --help`` answers at once.
"""
from __future__ import annotations

import argparse

from ._shell import positive_int
from .errors import RetrofitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--budget``, ``--measure`` and ``--repeats`` to the command line's parser."""
    def budget(text: str):
        from .budget import parse_budget  # torch: only once a budget is given, never for --help

        try:
            return parse_budget(text)
        except RetrofitError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parser.add_argument("--budget", action="append", type=budget, metavar="KIND=+LIMIT",
                        help="let a budget choose the sites and r (4, 8, 16, 32 unless --r is given) within the "
                             "selection: params=+2%%, flops=+0.5%%, latency=+5%% (measured here), params=+500k; "
                             "repeatable, all must hold. Rule: as many units as fit, then the smallest r, then "
                             "the latest stages")
    parser.add_argument("--measure", action="store_true",
                        help="also measure the edited model's latency and peak memory against the unedited one "
                             "on this machine (interleaved repeats; inference and a training step)")
    parser.add_argument("--repeats", type=positive_int(10000), default=10,
                        help="--measure and latency budgets: interleaved rounds per measurement (10)")

