"""`python -m cni_agent` is the same as the `cni-agent` console script."""

import sys

from cni_agent.cli import main

sys.exit(main())
