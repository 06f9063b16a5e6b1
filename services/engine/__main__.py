import os
import sys

# Before numpy and faiss load OpenBLAS: the engine parallelizes itself (search pool, OpenMP per call), and a
# second thread pool inside OpenBLAS only oversubscribes the cores and holds per-thread buffers (~2 MiB of RSS).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .cli import main

sys.exit(main())
