"""Tools around the service: the demo, the benchmark, the profiler, check-model and the
development helpers (sample texts, the bundled model, ``streamer broker``)."""
