"""Suite-wide collection rules.

``tests/triton_interpret`` needs ``TRITON_INTERPRET=1`` set before triton is first imported, which
a running pytest process cannot guarantee; ``test_triton_interpret.py`` runs that folder in a
separate pytest process with the variable set, so the main run does not collect it directly.

``tests/cuda`` holds the GPU checks (CUDA paths against their CPU twins); it is collected only
where CUDA is available (``benchmarks/gpu_check.sh`` runs it), so the CPU suite has no skips.
"""
import os

import torch

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton_interpret"]
if not torch.cuda.is_available():
    collect_ignore.append("cuda")

# Under pytest-xdist (make test runs two workers on the two cores) each worker keeps one intra-op
# thread, so the workers do not oversubscribe the cores; subprocess tests set OMP_NUM_THREADS=1.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
