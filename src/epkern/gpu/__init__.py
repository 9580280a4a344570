"""The GPU backend: ``runtime`` (device, region, streams, deadlines, launches), ``ht`` (high-throughput engine),
``ll/`` (low-latency engine), ``kernels`` (one launch description per kernel), ``tuning`` (typed, private knobs).
Imported only when a GPU Buffer is made (``import epkern`` stays light)."""
