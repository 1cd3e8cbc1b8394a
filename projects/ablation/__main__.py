"""`python -m projects.ablation` (from the repository root): see cli.py."""

import sys

from .cli import main

sys.exit(main())
