"""Make ``examples`` importable however pytest is started (``pytest`` does not put the repository root
on ``sys.path``; ``python -m pytest`` does)."""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
