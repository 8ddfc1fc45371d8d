"""fedfleet coordinator: the PyTorch server side (round engine, strategies, robust mixing, ledger, reports)."""
