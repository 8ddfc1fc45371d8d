"""What every column of every ledger table holds: one description each, next to the schema (`ledger.SCHEMA`).

`tests/coordinator/test_ledger_columns.py` checks that each column of the SQLite schema has one here; the docs
site's ledger reference is generated from `COLUMNS` (key "" of each table: the table's own description).
"""

from __future__ import annotations

TABLES: dict[str, str] = {
    "runs": "One row per run: when it started and the configuration it was started with.",
    "agent_rounds": "One row per agent per round and phase (more for refusals): what the agent was asked, what it "
                    "answered, the model-update bytes booked for it and the energy it reported.",
    "rounds": "One row per evaluated round: the global model's score and the round's counts.",
    "resumes": "One row per resume after a coordinator crash.",
    "task_accuracy": "Continual jobs: the accuracy on every task seen so far, after each round.",
    "traffic": "Every byte a device sent or received, by category, as the agent counted it (MQTT framing) and "
               "reported with each task's telemetry and when it leaves.",
    "sockets": "The agents' sockets' own counts (TCP payload, TLS included) over the same spans as `traffic`.",
    "layer_basis": "FOT: the size of each layer's orthogonal basis after each task.",
    "checkpoints": "The digest of each round's checkpoint file, booked as the round commits; resume refuses a "
                   "checkpoint whose bytes differ or that was never booked.",
}

_RUN = "The run id (start time and a random suffix; `job.json` holds it)."
_TS = "Unix time the row was written."

COLUMNS: dict[str, dict[str, str]] = {
    "runs": {
        "run": _RUN,
        "started": "Unix time the run was started.",
        "config": "The run's configuration as JSON (strategy, roster, engine settings ...).",
    },
    "agent_rounds": {
        "id": "Row number (insertion order).",
        "run": _RUN,
        "round": "Round number, from 1 (0: rows booked before the first round, e.g. start-up refusals).",
        "phase": "Phase within the round (methods with several exchanges per round; 0 otherwise).",
        "agent": "Agent id, or `(unauthenticated)` for summary rows of messages that failed authentication.",
        "status": "`ok`, `late`, `surplus` (tasked by over-selection, `over_select`, but not needed: the round's "
                  "cohort of `per_round` valid results was full before its result was taken), `dropped`, "
                  "`rejected:<reason>` (a refusal), or `interrupted:<status>` for a row of a round rerun after a "
                  "resume.",
        "bytes_up": "Model-update bytes from the agent: its result messages by the MQTT framing formula (PUBLISH "
                    "packet plus PUBACK).",
        "bytes_down": "Model-update bytes to the agent: its task and the round's state broadcast as it received it "
                      "(same formula).",
        "learn_s": "Seconds the agent reported for learning (wall time on the device).",
        "samples": "Local samples the agent learned on.",
        "queries": "Zeroth-order methods: function queries the agent made.",
        "energy_compute_j": "Joules of the learning (compute phase), as the agent's meter booked them (NULL: no "
                            "energy reported).",
        "energy_radio_j": "Joules of the radio: the transfers' time at idle power plus the profile's J/MB for every "
                          "byte the agent reported (NULL: none reported).",
        "energy_idle_j": "Joules idle while in the job, since the agent's previous report; time before the run's "
                         "first task is never booked (NULL: none reported).",
        "profile": "The agent's firmware profile (e.g. rpi4b), as it reported it.",
        "codec": "The uplink codec of the agent's result.",
        "detail": "Why, for a refusal, a late or a surplus row (and how many messages a summary row stands for).",
        "ts": _TS,
        "energy_meter": "What the energy is: `model` (modelled from the agent's firmware profile's power figures) "
                        "or the hardware meter that measured it (`rapl`, `jetson`, `rpi5`); NULL: not reported.",
        "version": "Asynchronous mode: the global model version the result was trained from (NULL in synchronous "
                   "rounds).",
        "staleness": "Asynchronous mode: versions published between that version and the result's arrival (NULL in "
                     "synchronous rounds).",
    },
    "rounds": {
        "run": _RUN,
        "round": "Round number, from 1.",
        "accuracy": "Test accuracy of the global model after the round (the task's score, e.g. x0 MSE, for tasks "
                    "without an accuracy; the mean over nodes for per-node methods).",
        "loss": "Test loss of the global model after the round.",
        "wall_s": "Seconds the round took at the coordinator.",
        "selected": "Agents tasked in the round.",
        "ok": "Agents whose result was accepted.",
        "rejected": "Results refused in the round (the round's `rejected:<reason>` rows are the count every view shows).",
        "bytes_up": "The coordinator's running count of result bytes received, at the end of the round.",
        "bytes_down": "The coordinator's running count of bytes it published (tasks, state), at the end of the round.",
        "ts": _TS,
        "accuracy_min": "Per-node methods (MoNNA): the worst node's accuracy (NULL otherwise).",
        "nodes": "Per-node methods: the honest nodes the accuracy is the mean of (0 otherwise).",
    },
    "resumes": {
        "run": _RUN,
        "round": "The first round of the resumed attempt.",
        "interrupted": "Agent rows of the interrupted round marked `interrupted:<status>`.",
        "ts": _TS,
    },
    "task_accuracy": {
        "run": _RUN,
        "round": "Round number.",
        "task": "Index of the task being learned in this round.",
        "task_name": "Name of that task.",
        "task_end": "1 in the last round of the task (those rows form the accuracy matrix).",
        "eval_task": "Index of the task evaluated.",
        "eval_name": "Name of the task evaluated.",
        "accuracy": "Accuracy on the evaluated task.",
        "loss": "Loss on the evaluated task.",
    },
    "traffic": {
        "run": _RUN,
        "round": "The round of the report that carried the bytes: traffic between two rounds goes to the round it "
                 "precedes (the start-up's package and CONNECT to the first); 0 is the run-level row of an agent's "
                 "last report, sent when it leaves.",
        "agent": "The agent's id (as on the roster).",
        "category": "model (the package, every time it was delivered), state (state broadcast), task, result, status, "
                    "telemetry, or control (CONNECT/CONNACK, SUBSCRIBE/SUBACK).",
        "bytes_up": "Bytes the agent sent in the category since its previous report (MQTT framing, PUBACKs with "
                    "their PUBLISH).",
        "bytes_down": "Bytes the agent received in the category since its previous report.",
        "ts": _TS,
    },
    "sockets": {
        "run": _RUN,
        "round": "As in `traffic`.",
        "agent": "The agent's id (as on the roster).",
        "bytes_up": "TCP payload bytes the agent's socket sent since its previous report (Linux TCP_INFO: TLS "
                    "records, control packets and keep-alives included, retransmissions once).",
        "bytes_down": "TCP payload bytes the agent's socket received since its previous report.",
        "ts": _TS,
    },
    "layer_basis": {
        "run": _RUN,
        "task": "Index of the task after which the basis was measured.",
        "task_name": "Name of that task.",
        "layer": "Layer name.",
        "k": "Basis size k_l (orthonormal directions kept for the layer).",
        "d": "The layer's input dimension d_l.",
    },
    "checkpoints": {
        "run": _RUN,
        "round": "The round whose checkpoint this is.",
        "sha256": "SHA-256 of the checkpoint file's bytes as written.",
        "ts": _TS,
    },
}


for _table, _about in TABLES.items():  # the table's description, as the docs site's generator reads it
    COLUMNS[_table] = {"": _about, **COLUMNS[_table]}
