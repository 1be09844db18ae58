"""Placeholder: `sample.py` is not built yet (see the open issues). It does nothing and says so."""

import sys

sys.exit("sample.py is not implemented yet; see README.md for what works today.")
