"""`python -m ufcram.handler` starts a node's handler process (loop.py's main)."""
from .loop import main

main()
