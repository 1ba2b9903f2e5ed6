"""``python se_retrofit_with_noop.py finetune RECIPE ...`` is ``se-retrofit finetune RECIPE ...`` with the
``noop`` attention type of transfer_noop.py registered first.

Why a launcher: a recipe naming a user-registered type (``retrofit: {attention: noop,
attention_module: transfer_noop}``) is refused unless the module is imported ("pass trust_code=True
(command line: --import transfer_noop)"), and ``se-retrofit finetune`` has no ``--import`` option
(``se-retrofit --import M finetune ...`` reads ``finetune`` as a model name). Importing the module
before the product's own ``main`` is what ``--import`` would do.
"""
import sys

import transfer_noop  # noqa: F401  (registers "noop")
from se_retrofit.cli import main

if __name__ == "__main__":
    sys.exit(main())
