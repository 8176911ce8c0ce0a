"""``python -m bark_serve.cli``: the same as the ``bark-serve`` command."""

import sys

from bark_serve.cli.main import main

sys.exit(main())
