"""``python -m sfumato``: the same as the ``sfumato`` command."""

import sys

from sfumato.cli import main

sys.exit(main())
