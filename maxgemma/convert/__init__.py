"""Checkpoint formats (one name map each) and the readers and writers export and import use."""
