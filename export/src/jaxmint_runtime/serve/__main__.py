"""``python -m jaxmint_runtime.serve``: the same as ``jaxmint-serve``."""

from jaxmint_runtime.serve._cli import main

raise SystemExit(main())
