"""jaxes: train in rounds, stop by a randomized tolerance, keep the best instance.

Submodules are imported explicitly (``from jaxes import stopping``) so that the
standard-library-only ``stopping`` never pulls in JAX.
"""

__version__ = "0.1.0"
