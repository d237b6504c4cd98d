"""The ``chipo`` command line."""
