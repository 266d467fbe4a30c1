"""``python -m perl_plugins.cli``: the same as the ``perl-plugins`` command."""

import sys

from perl_plugins.cli import main

sys.exit(main())
