"""Planning: simulated steps, each block's ops and op-level frontier, the profile, the planner and the time
model, per-rank memory under DDP and FSDP2, and the largest batch for a budget. It builds on `memfit.core`."""
