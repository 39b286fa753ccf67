"""vitune: visual instruction tuning (the LLaVA recipe) as a platform on Ray.

The facts every stage shares are defined here, once. Importing this package has no side effects;
submodules are imported where used.
"""

__version__ = "0.1.0"

IMAGE_TOKEN = "<image>"  # where a record's image goes in its first human turn
IGNORE_INDEX = -100  # label of a token that is not trained (prompt, image, padding); torch's cross-entropy default
HUMAN = "human"  # the "from" of a user turn in LLaVA records
GPT = "gpt"  # the "from" of an assistant turn
