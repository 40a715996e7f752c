import os

import torch

# Under pytest-xdist every worker would start one OpenMP thread per core; on a 2-core machine two
# workers x 2 threads spin-wait on each other and run several times slower than one thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
