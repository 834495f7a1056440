"""Hardware-in-the-loop profiling: device profiles, units, backends, latency tables, prediction."""
