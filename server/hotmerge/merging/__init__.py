"""Merging on the server: specs and keys (``spec``), the merge cache (``cache``), the merger that
turns a spec into a merged adapter on the device (``merger``), named merges (``named``) and
offline export as a PEFT adapter (``export``)."""
