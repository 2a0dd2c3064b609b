"""Command-line entry points (``axolotl-mote ...``). Nothing in the library imports
this."""
