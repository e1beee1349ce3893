"""``python -m qvlm ...``: see :mod:`qvlm.cli`."""

from qvlm.cli import main

raise SystemExit(main())
