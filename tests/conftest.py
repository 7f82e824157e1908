"""Shared test set-up."""

import os

# The tests serve the tiny random embedded default (built in seconds) unless a test names the
# real one (SmolLM2) itself.
os.environ.setdefault("HOTMERGE_EMBEDDED", "tiny")
