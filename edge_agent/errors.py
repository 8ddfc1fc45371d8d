"""Typed errors shared by the edge agent and the coordinator, and `Refusal`: every reason a message can be refused
for. Each message says what was wrong and what to do."""

from __future__ import annotations

from enum import Enum


class FedfleetError(Exception):
    """Base class of every fedfleet error."""


class Refusal(str, Enum):
    """Why a message was refused. The value is the ledger's status suffix (`rejected:<value>`), so values never
    change. A `str` subclass: it compares equal to, formats as and serialises as its value."""

    # envelope and authentication (the receive path; unauthenticated ones are only counted)
    UNKNOWN_AGENT = "unknown_agent"  # the sender's id (from the topic) is not on the roster: no key
    BAD_HMAC = "bad_hmac"  # the uplink HMAC does not verify under the sender's key
    BAD_AUTH = "bad_auth"  # the envelope names another authentication scheme than its topic needs
    BAD_SIGNATURE = "bad_signature"  # a downlink signature does not verify under the pinned coordinator key
    NO_COORDINATOR_KEY = "no_coordinator_key"  # the agent has no coordinator key pinned: it trusts no downlink
    VERSION = "version"  # the envelope speaks another wire version
    MALFORMED = "malformed"  # the envelope, header JSON, chunking or a field's encoding is broken
    OVERSIZED = "oversized"  # a message, header, payload or reassembly exceeds its cap
    SPOOFED = "spoofed"  # the header names another agent, fleet or kind than its topic
    SCHEMA = "schema"  # a header or body field has the wrong type or range
    REPLAYED = "replayed"  # a status or telemetry seq older than the last one accepted
    DIGEST = "digest"  # a reassembled payload does not match its header's digest
    DUPLICATE = "duplicate"  # a chunk received twice, or a second result for one task
    INTERNAL = "internal"  # a bug in the receive path (logged); the message is refused, the thread lives on
    # the open round (the engine's checks): these do not answer the agent's own open task
    WRONG_RUN = "wrong_run"  # a result for another run
    FUTURE_ROUND = "future_round"  # a result for a round or phase not open yet
    STALE_ROUND = "stale_round"  # a result for a round or phase already closed (a replay)
    NOT_SELECTED = "not_selected"  # a result from an agent with no task in the open phase
    LATE = "late"  # a result for a closed phase from an agent booked late there (its bytes join that row)
    # the result against its task
    CODEC = "codec"  # the result's codec is not the task's, or the codec spec is unknown or invalid
    SHAPE = "shape"  # the result's layout differs from the task's expected layout, or a payload's size does
    NONFINITE = "nonfinite"  # NaN or Inf values
    TOO_MANY_PAIRS = "too_many_pairs"  # a ferret payload holds more (seed, coefficient) pairs than its pool
    INDEX_RANGE = "index_range"  # a ferret seed index outside its pool
    DUPLICATE_INDEX = "duplicate_index"  # a ferret seed index appears twice
    STALENESS = "staleness"  # asynchronous mode: a result trained from a version older than max_staleness allows
    FUTURE_VERSION = "future_version"  # asynchronous mode: a result claims a model version not published yet
    WRONG_VERSION = "wrong_version"  # asynchronous mode: a result claims another version than its task carried
    NORM_BOUND = "norm_bound"  # the update's norm exceeds the bound (a multiple of the running median norm)
    RATE_LIMITED = "rate_limited"  # refusals of one agent in one phase past the itemised rows (one summary row)
    # a method's own checks (Strategy.check) and the class statistics they read
    NEGATIVE_N = "negative_n"  # a negative sample count
    N_MISMATCH = "n_mismatch"  # per-class counts differ from the agent's census
    UNKNOWN_CLASS = "unknown_class"  # classes that are not labels of the task
    CLASS_MISMATCH = "class_mismatch"  # classes other than the ones asked for
    NOT_SYMMETRIC = "not_symmetric"  # a covariance that is not symmetric
    NOT_PSD = "not_psd"  # a covariance that is not positive semi-definite
    CONFIG = "config"  # statistics that do not fit the method's configuration
    SKETCH_N = "sketch_n"  # a sketch's sample count is not positive
    SKETCH_RHO = "sketch_rho"  # a sketch's rho outside [0, 1]
    CENSUS_BOUND = "census_bound"  # census counts beyond the weight the coordinator allows the agent
    STATS_BOUND = "stats_bound"  # class statistics (mean, covariance spectrum) beyond the phase's robust bound
    SKETCH_BOUND = "sketch_bound"  # a task-end sketch beyond the phase's robust bound per layer
    AGGREGATE = "aggregate"  # the phase's aggregate was non-finite or exploded: the previous state was kept
    # the agent's downlink replica
    REPLICA = "replica"  # a state sync that does not lead to the named version or digest

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)

    @property
    def status(self) -> str:
        """The ledger status of a refusal for this reason."""
        return f"rejected:{self.value}"

    @property
    def answers_task(self) -> bool:
        """Whether a result refused for this reason answers the agent's own open task (and so closes its slot in
        the phase). A result for another run, round or phase, or from an agent not tasked, does not: a replayed
        old message must not close an agent's slot."""
        return self not in _NOT_ANSWERS


_NOT_ANSWERS = frozenset({Refusal.WRONG_RUN, Refusal.FUTURE_ROUND, Refusal.STALE_ROUND, Refusal.NOT_SELECTED,
                          Refusal.LATE})


def refusal(reason: Refusal | str) -> Refusal:
    """`reason` as a `Refusal`; a ValueError naming the enum for a string that is not one of its values."""
    try:
        return Refusal(reason)
    except ValueError:
        raise ValueError(f"{str(reason)[:64]!r} is not a refusal reason; use a member of "
                         "fedfleet.edge_agent.errors.Refusal (or add one there)") from None


class ProtocolError(FedfleetError):
    """A message on the wire is malformed, oversized, unsigned, stale or otherwise refused.

    `reason` is a `Refusal` (its string value is accepted too); it lands in the ledger as `rejected:<reason>`.
    """

    def __init__(self, reason: Refusal | str, detail: str = "") -> None:
        reason = refusal(reason)
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[object, tuple[type[ProtocolError], str, str]]:
        return _rebuild, (type(self), self.reason.value, self.detail)


def _rebuild(cls: type[ProtocolError], reason: str, detail: str) -> ProtocolError:
    """Unpickle a ProtocolError or subclass (their constructors take different arguments)."""
    err = cls.__new__(cls)
    ProtocolError.__init__(err, reason, detail)
    return err


class CodecError(ProtocolError):
    """A compressed payload is truncated, garbage, or would exceed its size cap when decoded."""

    def __init__(self, detail: str, reason: Refusal | str = Refusal.CODEC) -> None:
        super().__init__(reason, detail)


class ConfigError(FedfleetError):
    """A configuration file or option is wrong. The message names the file and the field."""


class ModelError(FedfleetError):
    """A model file or package is corrupt, truncated, or does not match its manifest."""
