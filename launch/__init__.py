"""Launchers: `launch.local` (processes on this machine) and `launch.tpu` (Cloud TPU VMs).

Stdlib only: no jax import anywhere under launch/.
"""
