"""Placeholder: `train.py` is not built yet (see the open issues). It does nothing and says so."""

import sys

sys.exit("train.py is not implemented yet; see README.md for what works today.")
