"""Imported first by the torch benchmarks, to set what they need before torch and triton load.

Passive OpenMP waiting, since spin-waiting threads collapse CPU throughput on shared cores; and, without a GPU,
Triton's interpreter, the only way its kernels run on a CPU.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
