"""Infrastructure: RabbitMQ clusters, byte audits, wheel checks, the aarch64 test bed."""
