"""The two character-level classifiers, their data, and the training loop.

BLAS threads: the products here are small (at most a few hundred rows), so a
second BLAS thread buys nothing, and on a shared machine its spin-waiting can
make an epoch many times slower (seen here: an LSTM epoch 25x slower while
another process trained). Unless the user chose otherwise, one thread. This
only takes effect when numpy has not been imported yet (the CLI imports us first).
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
