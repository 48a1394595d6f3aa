"""Run-time schedules: the state a host drives, step reuse, per-timestep heads, applying and calibrating."""
