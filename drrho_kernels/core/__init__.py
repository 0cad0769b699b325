"""The ops' contract, imported by every layer above: the checked inputs and options (``inputs``), the
per-anchor math that follows the kernels (``epilogue``), and the dispatcher ops (``ops``)."""
