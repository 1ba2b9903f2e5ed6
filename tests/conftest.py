"""pytest fixtures shared by several test files (none at present). Helpers that tests import as a
module live in helpers.py: ``from helpers import make_model``."""
