"""FOT (Federated Orthogonal Training, ICLR 2024) on the coordinator: FedAvg whose aggregated update of
each protected layer is projected orthogonally to that layer's basis U_l of earlier tasks' input subspace,
and, in the last round of each task, the global principal subspace extraction from the agents' sketches.

Runs inside a continual job (`fedfleet.coordinator.tasks.continual.ContinualStrategy` calls `set_task` every round).

Every round: the agents run plain SGD and upload delta_i = theta_i - theta. With uniform weights,
Delta = -mean_i delta_i; for each protected layer (out x in) Delta_l <- Delta_l - Delta_l U_l U_l^T; then
theta <- theta - Delta. Biases and unprotected layers (per-task heads) are averaged without projection.

Last round of a task: each agent also uploads S_i = R_hat_i G_i, rho_i and N_i (fedfleet.edge_agent.learners.fot),
all with the same width m_l per layer. Then per layer: S = sum_i S_i, rho_bar = sum_i (N_i / sum N) rho_i,
eps' = (rho_bar - (1 - eps)) / rho_bar, S = P diag(sigma) Q^T, k = the smallest k with
sum_{j<=k} sigma_j^2 / ||S||_F^2 > eps' (at least 1; the whole remaining space when eps' >= 1), and
U <- QR([U, P[:, :k]]); then eps <- eps + eps_inc. Only the agents of a task's last round shape its subspace
(as in the paper's code). Sketches always travel losslessly, even when the ordinary rounds use FedZip.

Against a liar with one device key (issue 28): N_i is taken at most at the agent's weight (the engine's capped
count); when the task-end phase closes (`screen`) each sketch is bounded per layer, ||S_i||_F / sqrt(N_i) against
`sketch_bound` (10) times the low median over the phase's senders and against `MAX_SKETCH_RMS` (a refused
sketch refuses its result, `rejected:sketch_bound`); and basis growth needs more than one sender's evidence:
with one sketch nothing is added, and with several the number of directions added is the smallest k over the
sums that leave one sender out (one sender's spread-out energy cannot fill the basis).

Config: `lr`, `epochs`, `batch`, `weight_decay` (passed to the learner), `eps` (0.95), `eps_inc` (0),
`protect` (weight names; default every weight matrix, but not the last layer with per-task heads),
`sketch_width` (m_l = round(sketch_width * d_l), 1.0), `sketch_distribution` ("uniform" | "gaussian"),
`threshold` ("norm": eps' from rho as in the paper's code; "energy": from rho^2, as GPM), `seed`, `uplink`;
`biases` ("free", the method: averaged without projection; "frozen": a diagnostic only, the biases stop
moving after the first task, to measure how much of the forgetting the free biases cause).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedfleet.coordinator.strategies._config import NON_NEGATIVE, POSITIVE, own, ranged
from fedfleet.coordinator.strategies._robust import low_median
from fedfleet.coordinator.strategies.base import (
    ClientResult,
    Strategy,
    TaskSpec,
    layout_of,
    orthonormal_columns,
    register,
    task_seed,
    to_numpy,
)
from fedfleet.edge_agent.errors import ConfigError, ProtocolError, Refusal
from fedfleet.edge_agent.learners.fot import BASIS, COUNT, RHO, SKETCH

LOSSLESS = ("none", "zstd")
MAX_SKETCH_RMS = 1e6  # absolute bound on a sketch's ||S_i||_F / sqrt(N_i) per layer
RHO_TOLERANCE = 1e-3


def project_out(update: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """update (out x in) with its rows' components in span(basis) (in x k, orthonormal) removed."""
    if basis.shape[1] == 0:
        return update
    return update - (update @ basis) @ basis.T


def threshold(rho_bar: float, eps: float, mode: str = "norm") -> float:
    """eps' = (r - (1 - eps)) / r with r = rho_bar ("norm", the paper's code) or rho_bar^2 ("energy", GPM)."""
    r = rho_bar if mode == "norm" else rho_bar**2
    return (r - (1.0 - eps)) / r


def choose_k(sigma: torch.Tensor, eps_prime: float, room: int) -> int:
    """How many leading singular vectors to add: the smallest k whose energy share exceeds eps', at least 1,
    everything available when eps' >= 1; never more than `room` (= d - k_old)."""
    available = min(room, int(sigma.numel()))
    if available <= 0:
        return 0
    if eps_prime >= 1.0:
        return available
    energy = sigma.double() ** 2
    share = torch.cumsum(energy, 0) / energy.sum()
    k = int(torch.searchsorted(share, torch.tensor([eps_prime], dtype=share.dtype), right=True)[0]) + 1
    return max(1, min(k, available))


def subspace_update(basis: torch.Tensor, sketch: torch.Tensor, rho_bar: float, eps: float,
                    mode: str = "norm", *, most: int | None = None) -> tuple[torch.Tensor, int]:
    """(new basis, vectors added) from the summed sketch S (d x m) of one layer; at most `most` vectors."""
    d = basis.shape[0]
    if rho_bar <= 0 or not torch.any(sketch != 0):
        return basis, 0  # nothing outside the basis: no direction to add
    p, sigma, _ = torch.linalg.svd(sketch.double(), full_matrices=False)
    k = choose_k(sigma, threshold(rho_bar, eps, mode), d - basis.shape[1])
    if most is not None:
        k = min(k, most)
    if k == 0:
        return basis, 0
    new = p[:, :k]
    old = basis.double()
    new = new - old @ (old.T @ new)  # numerically outside U already; make it exact before the QR
    q, _ = torch.linalg.qr(torch.cat([old, new], dim=1))
    return q[:, : old.shape[1] + k].float(), k


@dataclass(frozen=True)
class Config:
    """FOT's [method] fields; on the spec's permuted digits: 1 local epoch, batch 16, lr 0.05, eps 0.95, no
    threshold increment."""

    lr: float = 0.05  # local SGD learning rate
    epochs: int = 1  # local epochs per round
    batch: int = 16  # local minibatch size
    weight_decay: float = 1e-5  # the learner's L2 weight decay
    eps: float = ranged(0.95, check=(lambda v: 0 < v <= 1, "a number in (0, 1]"))  # energy threshold
    eps_inc: float = ranged(0.0, check=NON_NEGATIVE)  # added to eps after each task
    sketch_width: float = own(1.0, check=POSITIVE)  # m_l = round(sketch_width * d_l)
    sketch_distribution: Literal["uniform", "gaussian"] = own("uniform")
    threshold: Literal["norm", "energy"] = own("norm")  # eps' from rho (the paper's code) or rho^2 (GPM)
    biases: Literal["free", "frozen"] = own("free")  # "frozen": a diagnostic (see the module docstring)
    protect: list[str] | None = own(None)  # weight names (None: every weight matrix but a per-task head's)
    sketch_bound: float = own(10.0, check=(lambda v: v >= 1, "a number >= 1"))  # x the low-median sketch scale


@register
class FOTStrategy(Strategy):
    name = "fot"
    Config = Config
    learner = "fot"
    continual = "required"

    def __init__(self, state: dict[str, torch.Tensor], **config: Any) -> None:
        super().__init__(state, **config)
        self.eps = float(self.settings.eps)
        self.eps_inc = float(self.settings.eps_inc)
        self.width = float(self.settings.sketch_width)
        self.distribution = str(self.settings.sketch_distribution)
        self.mode = str(self.settings.threshold)
        self.biases = str(self.settings.biases)
        if not 0 < self.eps <= 1 or self.eps_inc < 0 or self.width <= 0:
            raise ConfigError(f"fot: need 0 < eps <= 1, eps_inc >= 0, sketch_width > 0; got {self.eps}, "
                              f"{self.eps_inc}, {self.width}")
        if (self.distribution not in ("uniform", "gaussian") or self.mode not in ("norm", "energy")
                or self.biases not in ("free", "frozen")):
            raise ConfigError("fot: sketch_distribution is 'uniform' or 'gaussian', threshold 'norm' or 'energy', "
                              "biases 'free' or 'frozen'")
        self.weights = [k for k in self.state if k.endswith(".weight") and self.state[k].dim() == 2]
        self.protected: list[str] | None = None  # fixed at the first task (it depends on the head)
        self.bases: dict[str, torch.Tensor] = {}
        self.position: Any = None
        self.history: list[dict[str, Any]] = []  # per finished task: eps', k added and k/d per layer

    # -------------------------------------------------------------- schedule
    def set_task(self, position: Any) -> None:
        self.position = position
        if self.protected is None:
            default = self.weights[:-1] if position.head == "task" else self.weights
            protect = list(self.config.get("protect") or default)
            unknown = [n for n in protect if n not in self.weights]
            if unknown:
                raise ConfigError(f"fot: field 'protect' names {unknown}; the weight matrices are {self.weights}")
            self.protected = protect
            self.bases = {n: torch.zeros(self.state[n].shape[1], 0) for n in protect}

    def _sketch_round(self) -> bool:
        return self.position is not None and self.position.last and bool(self.protected)

    def _m(self, name: str) -> int:
        return max(1, int(round(self.width * self.state[name].shape[1])))

    # -------------------------------------------------------------- rounds
    def configure(self, round: int, phase: int, agents: list[str]) -> dict[str, TaskSpec]:
        cfg = {k: self.config[k] for k in ("lr", "epochs", "batch", "weight_decay") if k in self.config}
        tensors = to_numpy(self.state)
        expect = layout_of(self.state)
        uplink = dict(self.config.get("uplink", {"name": "none"}))
        if self._sketch_round():
            assert self.protected is not None
            cfg["fot"] = {"sketch": True, "layers": [[n, self._m(n)] for n in self.protected],
                          "distribution": self.distribution}
            for n in self.protected:
                if self.bases[n].shape[1]:
                    tensors[BASIS + n] = self.bases[n].numpy().astype(np.float32)
            expect += [(SKETCH + n, (self.state[n].shape[1], self._m(n))) for n in self.protected]
            expect += [(RHO, (len(self.protected),)), (COUNT, (1,))]
            if uplink.get("name") not in LOSSLESS:
                uplink = {"name": "none"}  # sketches travel losslessly whatever the rounds' codec
        seed = int(self.config.get("seed", 0))
        return {a: TaskSpec(config={**cfg, "seed": task_seed(seed, round, phase, a)}, tensors=tensors,
                            expect=list(expect), uplink_codec=uplink) for a in agents}

    def update_names(self, phase: int) -> set[str] | None:
        """The update is the model's tensors; a task end's sketches, rho and n ride along and are not bounded."""
        return set(self.state)

    def check(self, round: int, phase: int, result: ClientResult) -> None:
        if COUNT not in result.tensors:
            return
        n = float(result.tensors[COUNT][0])
        if not (n >= 1 and n == int(n) and n < 1 << 31):
            raise ProtocolError("sketch_n", f"N_i must be a positive sample count, got {n}")
        claimed = result.metrics.get("_samples_claimed")
        if claimed is not None and n > claimed:  # the sketch covers the task's own samples, no more
            raise ProtocolError("sketch_n", f"N_i = {n:.0f} exceeds the {claimed:.0f} samples the result claims")
        rho = result.tensors[RHO]
        if np.any(rho < 0) or np.any(rho > 1 + RHO_TOLERANCE):
            raise ProtocolError("sketch_rho", f"rho_i must lie in [0, 1], got {rho.tolist()}")

    def screen(self, round: int, phase: int, results: list[ClientResult]) -> list[tuple[ClientResult, str, str]]:
        """A task end's sketches, per layer: ||S_i||_F / sqrt(N_i) against `sketch_bound` times the low median over
        the phase's senders, and against MAX_SKETCH_RMS."""
        sketched = [r for r in results if COUNT in r.tensors]
        if not sketched or not self.protected:
            return []
        out: dict[str, tuple[ClientResult, str, str]] = {}
        k = float(self.settings.sketch_bound)
        for name in self.protected:
            scale = {r.agent: float(np.linalg.norm(r.tensors[SKETCH + name].astype(np.float64)))
                     / np.sqrt(self._n(r)) for r in sketched}
            ref = low_median(v for v in scale.values() if np.isfinite(v))
            limit = min(MAX_SKETCH_RMS, k * ref) if len(scale) > 1 else MAX_SKETCH_RMS
            for r in sketched:
                v = scale[r.agent]
                if r.agent not in out and not (np.isfinite(v) and v <= limit):
                    out[r.agent] = (r, Refusal.SKETCH_BOUND, f"{name} sketch scale {v:.4g} exceeds the bound {limit:.4g}")
        return list(out.values())

    @staticmethod
    def _n(result: ClientResult) -> float:
        """N_i, at most the agent's weight (the engine's capped count): its word does not set the rho weights."""
        return max(1.0, min(float(result.tensors[COUNT][0]), float(result.samples)))

    def aggregate(self, round: int, phase: int, results: list[ClientResult]) -> None:
        if not results:
            return
        frozen = self.biases == "frozen" and self.position is not None and self.position.index > 0
        for name in self.state:
            if frozen and name.endswith(".bias"):
                continue
            update = torch.stack([torch.from_numpy(r.tensors[name]) for r in results]).mean(dim=0)  # -Delta
            if name in self.bases:
                update = project_out(update, self.bases[name])
            self.state[name] += update
        if self._sketch_round():
            self._extract(results)

    def _extract(self, results: list[ClientResult]) -> None:
        """The global principal subspace extraction at a task's end."""
        assert self.protected is not None
        n = torch.tensor([self._n(r) for r in results], dtype=torch.float64)
        w = n / n.sum()
        rho = torch.stack([torch.from_numpy(r.tensors[RHO]).double() for r in results])  # clients x layers
        record: dict[str, Any] = {"task": self.position.index, "eps": self.eps, "clients": len(results), "layers": {}}
        for j, name in enumerate(self.protected):
            parts = torch.stack([torch.from_numpy(r.tensors[SKETCH + name]).double() for r in results])
            sketch = parts.sum(dim=0)
            rho_bar = float((w * rho[:, j]).sum())
            most = self._agreed(parts, rho_bar, self.bases[name])
            self.bases[name], added = subspace_update(self.bases[name], sketch, rho_bar, self.eps, self.mode,
                                                      most=most)
            record["layers"][name] = {"rho_bar": rho_bar, "eps_prime": threshold(rho_bar, self.eps, self.mode)
                                      if rho_bar > 0 else None, "added": added, "k": self.bases[name].shape[1],
                                      "d": self.bases[name].shape[0]}
        self.history.append(record)
        self.eps = min(1.0, self.eps + self.eps_inc)

    def _agreed(self, parts: torch.Tensor, rho_bar: float, basis: torch.Tensor) -> int:
        """How many directions more than one sender supports: 0 with one sketch, else the smallest k over the
        sums that leave one sender out."""
        if parts.shape[0] < 2:
            return 0
        room = basis.shape[0] - basis.shape[1]
        ks = []
        for i in range(parts.shape[0]):
            rest = torch.cat([parts[:i], parts[i + 1:]]).sum(dim=0)
            if rho_bar <= 0 or not torch.any(rest != 0):
                return 0
            sigma = torch.linalg.svdvals(rest)
            ks.append(choose_k(sigma, threshold(rho_bar, self.eps, self.mode), room))
        return min(ks)

    # -------------------------------------------------------------- reporting
    def basis_sizes(self) -> dict[str, tuple[int, int]]:
        """layer -> (k_l, d_l)."""
        return {n: (int(u.shape[1]), int(u.shape[0])) for n, u in self.bases.items()}

    def round_note(self) -> str:
        if not self.bases:
            return ""
        return "basis " + " ".join(f"{n.split('.')[0]} {k}/{d}" for n, (k, d) in self.basis_sizes().items())

    def extra_state(self) -> dict[str, Any]:
        return {"bases": {n: u.clone() for n, u in self.bases.items()}, "eps": self.eps, "history": self.history}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore the protected subspaces, eps and the per-task history on resume. Each basis must belong to a
        weight matrix of the model, have its input width as rows, no more columns than rows, finite orthonormal
        columns; eps must be in (0, 1]. Anything else is a ValueError (a one-line refusal to resume)."""
        bases, eps, history = extra.get("bases"), extra.get("eps"), extra.get("history")
        if not isinstance(bases, dict) or not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("fot: the checkpoint's 'bases' must be a table of tensors and 'history' a list of tables")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < float(eps) <= 1:
            raise ValueError(f"fot: the checkpoint's eps {eps!r} is not in (0, 1]")
        restored: dict[str, torch.Tensor] = {}
        for name, u in bases.items():
            if name not in self.weights:
                raise ValueError(f"fot: the checkpoint protects {name!r}, not a weight matrix of this model")
            d = self.state[name].shape[1]
            if not isinstance(u, torch.Tensor) or u.dim() != 2 or u.shape[0] != d or u.shape[1] > d:
                raise ValueError(f"fot: the checkpoint's basis for {name} is not a ({d}, k <= {d}) matrix")
            u = u.to(torch.float32)
            if not orthonormal_columns(u):
                raise ValueError(f"fot: the checkpoint's basis for {name} is not finite with orthonormal columns")
            restored[name] = u.clone()
        self.bases, self.eps, self.history = restored, float(eps), [dict(h) for h in history]
        self.protected = list(restored) if restored else None  # set_task keeps them (it fills only when None)
