"""`python -m ufcram ...` is the `ufcram` command."""
import sys

from .cli import main

sys.exit(main())
