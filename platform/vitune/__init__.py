"""vitune: visual instruction tuning (the LLaVA recipe) as a platform on Ray.

Importing this package has no side effects; submodules are imported where used.
"""

__version__ = "0.1.0"
IMAGE_TOKEN = "<image>"
