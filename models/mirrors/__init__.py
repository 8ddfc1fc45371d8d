"""Torch mirrors of the edge models: the coordinator's copy of a package's trainable part."""
