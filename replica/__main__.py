"""`python -m replica ...` runs the replica command line."""

import sys

from replica.cli import main

sys.exit(main())
