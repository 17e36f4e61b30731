"""Device backends behind one interface: nvml (real GPUs), sim (modeled GPUs), cpu (the host)."""
