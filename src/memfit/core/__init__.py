"""The checkpointing core: what memfit does to a training step (modes and strategies, the chains of blocks,
the checkpoint primitive and its pruned and on-demand recomputes, wrapping blocks, schedules and plans as
values) and the instruments that measure a step (the memory tracker, the FLOP counter, real steps side by
side). It imports nothing else of memfit but `memfit.errors`."""
