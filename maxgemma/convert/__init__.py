"""Name maps between maxgemma's parameter tree and other checkpoint formats."""
