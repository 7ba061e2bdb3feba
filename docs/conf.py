# Sphinx configuration of Panther's API reference (make docs). Pages are generated from the
# docstrings by autodoc; the build is offline (no intersphinx) and warnings are errors.
import panther  # the installed build (make docs builds and installs it first)

project = "Panther (torch-panther)"
author = "The Panther authors"
copyright = "2026, The Panther authors"
release = panther.__version__
version = release.split("+")[0]

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
# The Markdown guides (deploy.md, distributed.md, testing.md) are read on their own, not built.
exclude_patterns = ["_build", "*.md"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_static_path = []
