"""The round engine: rounds and phases, the receive path, validation, the downlink."""
