"""The release number of Panther: the one place it is written.

The build reads it (``build_support/panther_metadata.py`` for the wheel's metadata, CMake for the
``panther._C`` build information). A built wheel's version adds, as a local version label, the
torch minor it was built against (``0.1.0+torch2.13``); ``panther.__version__`` reports that full
version, the same string ``pip show torch-panther`` prints.
"""

__version__ = "0.1.0"
