"""Fleet emulator, broker launcher and benchmarks (`fedfleet bench NAME` runs `tools.bench_NAME.main`)."""
