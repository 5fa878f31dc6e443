"""One threading policy for ITK (ANTs) across the package.

ITK fixes its thread count when ANTs is first loaded in a process, and multi-threaded Mattes
mutual information sums in a thread-dependent order: two registrations with two threads and
the same seed differ (measured: affine parameters by up to 0.8), with one thread they are
identical. ``--seed`` must give identical outputs, so ANTs runs single-threaded unless the user
sets ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS. Call this before ``import ants`` (modules that use
ANTs import it lazily for that reason); parallelism comes from nipype running nodes at once.
"""

import os


def reproducible_itk_threads() -> None:
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
