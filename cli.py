#!/usr/bin/env python
"""Thin shim: `python cli.py ...` runs the same app as the `weightx` command."""

from weightx.cli import main

if __name__ == "__main__":
    main()
