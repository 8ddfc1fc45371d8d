"""Tools above the coordinator: benchmarks (`bench/`), the fleet emulator (`emulate/`) and infrastructure
(`infra/`: RabbitMQ clusters, byte audits, wheel checks, the aarch64 test bed)."""
