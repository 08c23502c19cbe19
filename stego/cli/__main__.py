"""``python -m stego.cli``: the same as the ``stego`` command."""

import sys

from stego.cli.main import main

sys.exit(main())
