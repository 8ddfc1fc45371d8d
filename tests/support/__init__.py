"""Test support: a fleet on a broker through the one assembly path, rogue agents."""
