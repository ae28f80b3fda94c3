import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the offline switches, which transformers reads at import)

# One torch thread for the whole session: the tiny test models are dominated by threading overhead (about 10x
# slower with more threads on a shared 2-core machine), and results do not depend on the machine's core count.
# Tests that need another count set it locally and restore it (test_bench_sd).
torch.set_num_threads(1)
