"""``python -m onboardflow.runners.cli``: the same as the ``onboardflow`` command."""
import sys

from . import main

sys.exit(main())
