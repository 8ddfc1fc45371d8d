"""The round engine: `rounds.Coordinator` (alias `Engine`) composes the receive path, presence, dispatch, the
typed inbox, one `phase.Phase` per (round, phase) with its `validate.Validator` and `books.PhaseBooks`, and the
downlink state sync."""
