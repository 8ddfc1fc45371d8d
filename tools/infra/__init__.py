"""Infrastructure: RabbitMQ and aedes+Redis clusters, byte audits, wheel checks, the aarch64 test bed."""
