"""The training machinery: sharded state, the jitted step, checkpoints and the loop."""
