"""`python -m ufcram ...` is the `ufcram` command."""
import sys

from ufcram.tools.cli import main

sys.exit(main())
