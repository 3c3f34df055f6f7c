"""Toy-scale replication of the paper's claims (arXiv 2602.08503, Tables 2-3): the command line.

The code is the package bench/toy/, one module per concern: recipe (task, arms, settings,
splits, provenance), calibration (the rare regime's cold start and its calibration), arms (the
RL arms and the learning-rate rule), stats (the aggregate and the claims' statistics), report
(report.md's tables and the plots), dense (the first, dense-correction experiment), driver (the
command line and the jobs). `python bench/toy_replication.py --help` lists the commands; every
public name of the package can be imported from here too.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from toy.arms import *  # noqa: E402, F403
from toy.calibration import *  # noqa: E402, F403
from toy.dense import *  # noqa: E402, F403
from toy.driver import *  # noqa: E402, F403
from toy.driver import main  # noqa: E402
from toy.recipe import *  # noqa: E402, F403
from toy.report import *  # noqa: E402, F403
from toy.stats import *  # noqa: E402, F403

if __name__ == "__main__":
    main()
