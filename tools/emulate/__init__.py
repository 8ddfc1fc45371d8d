"""The fleet emulator: emulated agents with device profiles, agent pools, traffic shaping."""
