"""``python -m cluster.plan``: the deployment planner (:mod:`analysis.plan`, torch- and Ray-free, lives in
``analysis/``; this is its entry point under the cluster's name). See ``python -m cluster.plan --help``."""

from __future__ import annotations

import sys

from analysis.plan import main

if __name__ == "__main__":
    sys.exit(main())
