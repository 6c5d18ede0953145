"""Pipeline parallelism: schedules as data (1F1B, DualPipe, DualPipeV), a simulator that checks
and times them, one executor, the zero-bubble weight-gradient split. See docs/pipeline.md."""
