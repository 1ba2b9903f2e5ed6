"""``python -m se_retrofit`` runs the command line."""
from .cli import main

raise SystemExit(main())
