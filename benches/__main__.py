"""``python -m benches``: see ``benches.run``."""

from __future__ import annotations

import sys

from .run import main

sys.exit(main())
