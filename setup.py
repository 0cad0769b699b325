"""Build script: the Python package, plus the C++ CPU extension when a compiler is available.

See csrc/. The extension is optional: if it cannot be built the package installs without it and
falls back to the torch backend at run time (with one warning naming the cause).
"""
from setuptools import setup

setup()
