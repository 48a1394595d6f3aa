"""``python -m prompt_fragments``: the same as the ``prompt-fragments`` command."""
from .cli import main

raise SystemExit(main())
