"""Plumbing shared by the scripts: errors, distributed set-up, logging, checkpoints."""
