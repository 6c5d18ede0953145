"""The megads launcher: `python launch/run.py` locally and on every node of a Slurm job."""
