"""FZooS's edge learner: trajectory-informed surrogate gradients with an RFF-based global correction.

The agent keeps a bounded query history (exploration appends points; stored points never move; see
"History" below) and its last uploaded RFF weights s_i ν_i across rounds of one run (a new run id starts a
fresh history). Two phases per round:

- phase 0 (local steps), task tensors: "nu_bar" (M,) from round 2, and the ZO tensors at x_{r-1} only if
  this agent does not hold them already (it got x_{r-1} in the previous round's phase 1, so the spec's
  downlink of d + M + 1 floats per round is not paid twice; see "Held tensors").
  Query f(x_{r-1}); then T times: fit a GP (Matérn-5/2 by default) on the `gp_points` stored queries
  nearest x, take the analytic mean gradient, add γ_t ∇φ(x)ᵀ(ν̄ − s_i ν_i) with γ_t = 1/(t+1), take an
  Adam step, query f(x), and (except after the last step) query the `explore_pick` of `explore_candidates`
  points uniform in x ± explore_radius with the largest trace of the gradient-posterior covariance.
  Upload the ZO tensors at x_{r,T}.
- phase 1 (surrogate refresh), task tensors: the ZO tensors at the averaged x_r; config "rho".
  Query f(x_r); explore `refresh_pick` of `refresh_candidates` points in x_r ± rho; fit the RFF ridge on the
  `rff_points` stored queries nearest x_r; upload {"nu": s_i ν_i}.

ρ_i = mean|x_r − x^(i)|/2 as the spec says; with `rho_floor` set (off by default, a deviation from the
spec), the refresh radius is max(ρ_i, explore_radius), which keeps the refresh from collapsing onto x_r
when every agent's iterate lands on x_r (one agent, or identical shards).

History: after each refresh the agent keeps only the `history_points` stored queries nearest x_r (1000 by
default, at least `rff_points` and `gp_points`), the spec's windows being the 150 nearest the iterate
(GP) and the 500 nearest x_r (RFF). The history then never exceeds history_points + one round's queries
(107 at T = 10), instead of growing by that much every round. `history_points = 0` keeps everything.

Held tensors: a task's config "versions" maps every tensor the problem needs to the coordinator's version
of it; a tensor left out of the task is taken from what this learner received earlier at that version, and
a task that leaves out a tensor this learner does not hold at that version is refused (ConfigError), so the
coordinator resends it. Tasks without "versions" carry everything.

On its first task the agent also queries `init_points` points uniform in x0 ± init_radius. Every
objective call is counted in metrics["queries"].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.learners.base import Learner, LearnResult, LocalData, Task, register
from fedfleet.edge_agent.zo import gp as gpm
from fedfleet.edge_agent.zo import optim, problem
from fedfleet.edge_agent.zo import rff as rffm
from fedfleet.edge_agent.zo.objectives import Counted

DEFAULTS: dict[str, Any] = {
    "local_steps": 10,
    "lr": 0.01,
    "optimizer": "adam",
    "gp_kernel": "matern52",
    "gp_points": 150,
    "gp_restarts": 20,
    "gp_noise": 1e-6,
    "explore_radius": 0.01,
    "explore_candidates": 100,
    "explore_pick": 5,
    "init_points": 10,
    "init_radius": 0.01,
    "refresh_candidates": 200,
    "refresh_pick": 50,
    "rff_points": 500,
    "rff_features": 10000,
    "rff_lengthscale": 1.0,
    "rff_seed": 0,
    "rff_jitter": 1e-6,
    "history_points": 1000,
    "rho_floor": False,
    "correction": True,
    "seed": 0,
}


def settings(config: dict[str, Any]) -> dict[str, Any]:
    unknown = set(config) - set(DEFAULTS) - {"objective", "c1", "c2", "zo_tensors", "zo_path", "rho", "versions"}
    if unknown:
        raise ConfigError(f"unknown fzoos settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **config}
    keep = int(s["history_points"])
    if keep and keep < max(int(s["rff_points"]), int(s["gp_points"])):
        raise ConfigError(f"fzoos history_points ({keep}) must be 0 (keep all) or at least rff_points "
                          f"({s['rff_points']}) and gp_points ({s['gp_points']})")
    return s


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


@register
class FZooSLearner(Learner):
    name = "fzoos"

    def __init__(self) -> None:
        self.xs: list[np.ndarray] = []
        self.ys: list[float] = []
        self.own_nu: np.ndarray | None = None
        self.run: str | None = None
        self.held: dict[str, tuple[int, np.ndarray]] = {}  # tensor name -> (coordinator's version, value)

    # -- history -----------------------------------------------------------------------------------

    def _query(self, f: Counted, x: np.ndarray) -> float:
        y = f(x)
        self.xs.append(np.array(x, np.float64))
        self.ys.append(y)
        return y

    def _history(self) -> tuple[np.ndarray, np.ndarray]:
        return np.stack(self.xs), np.asarray(self.ys)

    def _prune(self, centre: np.ndarray, keep: int) -> None:
        """Keep the `keep` stored queries nearest `centre` (in their original order); 0 keeps all."""
        if not keep or len(self.xs) <= keep:
            return
        xh, _ = self._history()
        idx = np.sort(gpm.nearest(xh, centre, keep))
        self.xs = [self.xs[i] for i in idx]
        self.ys = [self.ys[i] for i in idx]

    def _task_tensors(self, task: Task) -> dict[str, np.ndarray]:
        """The problem's tensors: those in the task, plus held ones the task names in "versions"."""
        sent = {k: v for k, v in task.tensors.items() if k != "nu_bar"}
        versions = task.config.get("versions")
        if versions is None:
            return sent
        out = {}
        for name, version in versions.items():
            if name in sent:
                self.held[name] = (int(version), np.array(sent[name], copy=True))
                out[name] = sent[name]
            elif name in self.held and self.held[name][0] == int(version):
                out[name] = self.held[name][1]
            else:
                raise ConfigError(f"fzoos task leaves out tensor {name!r} at version {version}, which this agent "
                                  "does not hold; the coordinator must send it")
        return out

    def _explore(self, f: Counted, post: gpm.GPPosterior, centre: np.ndarray, radius: float, candidates: int,
                 pick: int, rng: np.random.Generator) -> list[float]:
        """Query the `pick` candidates in centre ± radius with the largest gradient-variance trace; their values."""
        if pick <= 0:
            return []
        cand = centre[None, :] + rng.uniform(-radius, radius, (candidates, centre.shape[0]))
        score = post.grad_var_trace(cand)
        return [self._query(f, cand[i]) for i in np.argsort(-score)[: min(pick, candidates)]]

    def _fit_gp(self, s: dict[str, Any], target: np.ndarray, rng: np.random.Generator) -> gpm.GPPosterior:
        xh, yh = self._history()
        return gpm.fit_local(xh, yh, target, kind=s["gp_kernel"], max_points=int(s["gp_points"]),
                             restarts=int(s["gp_restarts"]), noise=float(s["gp_noise"]), rng=rng)

    def _condition(self, s: dict[str, Any], target: np.ndarray, like: gpm.GPPosterior) -> gpm.GPPosterior:
        """Same hyper-parameters, conditioned on the stored points nearest `target` (incl. the newest)."""
        xh, yh = self._history()
        idx = gpm.nearest(xh, target, int(s["gp_points"]))
        return gpm.GPPosterior.condition(xh[idx], yh[idx], kind=like.kind, lengthscale=like.lengthscale,
                                         noise=float(s["gp_noise"]))

    # -- phases ------------------------------------------------------------------------------------

    def learn(self, task: Task, data: LocalData, model: Any) -> LearnResult:
        s = settings(task.config)
        if self.run != task.run:
            self.xs, self.ys, self.own_nu, self.held, self.run = [], [], None, {}, task.run  # a new run: forget
        tensors = self._task_tensors(task)
        prob = problem.build(s, tensors, data, model)
        rng = np.random.Generator(np.random.PCG64(int(s["seed"])))
        rff = rffm.RFF.from_seed(prob.view.d, int(s["rff_features"]), float(s["rff_lengthscale"]),
                                 int(s["rff_seed"]))
        samples = len(data) if data is not None and len(data) else 1
        if self.xs and self.xs[0].shape != prob.x0.shape:
            self.xs, self.ys, self.own_nu = [], [], None  # another problem in the same run: forget the history
        if not self.xs:
            r0 = float(s["init_radius"])
            for _ in range(int(s["init_points"])):
                self._query(prob.objective, prob.x0 + rng.uniform(-r0, r0, prob.view.d))
        if task.phase == 0:
            nu_bar = task.tensors.get("nu_bar")
            if nu_bar is not None and nu_bar.shape != (rff.m,):
                raise ConfigError(f"nu_bar has shape {nu_bar.shape}, expected ({rff.m},); check rff_features")
            return self._local_steps(s, prob, rff, nu_bar, rng, samples)
        if task.phase == 1:
            return self._refresh(s, prob, rff, rng, samples)
        raise ConfigError(f"fzoos has phases 0 and 1, got phase {task.phase}")

    def _local_steps(self, s: dict[str, Any], prob: problem.Problem, rff: rffm.RFF, nu_bar: np.ndarray | None,
                     rng: np.random.Generator, samples: int) -> LearnResult:
        f = prob.objective
        x = prob.x0.copy()
        first = self._query(f, x)
        last = first
        opt = optim.make(str(s["optimizer"]), float(s["lr"]))
        steps = int(s["local_steps"])
        corr = None
        if nu_bar is not None and self.own_nu is not None and s["correction"]:
            corr = np.asarray(nu_bar, np.float64) - self.own_nu
        cos_gp: list[float] = []
        cos_dir: list[float] = []
        scales: list[float] = []
        norms: list[float] = []
        ties = explored = 0
        for t in range(steps):
            post = self._fit_gp(s, x, rng)
            g = post.grad_mean(x)
            scales.append(float(post.lengthscale))
            norms.append(float(np.linalg.norm(g)))
            if f.has_grad:
                cos_gp.append(_cos(g, f.true_grad(x)))
            if corr is not None:
                g = g + rff.grad(x, corr) / (t + 1.0)
            if f.has_grad:
                cos_dir.append(_cos(g, f.true_grad(x)))
            x = opt.step(x, g)
            last = self._query(f, x)
            if t < steps - 1:
                ys = self._explore(f, self._condition(s, x, post), x, float(s["explore_radius"]),
                                   int(s["explore_candidates"]), int(s["explore_pick"]), rng)
                ties += sum(y == last for y in ys)
                explored += len(ys)
        # diagnostics: the fitted lengthscale, the surrogate gradient's norm, and how often an exploration
        # query returned exactly the iterate's value (a piecewise-constant objective ties a lot)
        metrics: dict[str, float] = {"queries": int(f.queries), "objective_first": first, "objective_last": last,
                                     "history": len(self.xs), "corrected": int(corr is not None),
                                     "gp_lengthscale": float(np.mean(scales)) if scales else 0.0,
                                     "gp_grad_norm": float(np.mean(norms)) if norms else 0.0,
                                     "explore_tie_fraction": ties / explored if explored else 0.0}
        if cos_gp:
            metrics["gp_cosine"] = float(np.mean(cos_gp))
            metrics["direction_cosine_local"] = float(np.mean(cos_dir))
        return LearnResult(prob.tensors(x), samples, metrics)

    def _refresh(self, s: dict[str, Any], prob: problem.Problem, rff: rffm.RFF, rng: np.random.Generator,
                 samples: int) -> LearnResult:
        f = prob.objective
        xr = prob.x0.copy()
        y_r = self._query(f, xr)
        rho = float(s.get("rho", 0.0))
        if s["rho_floor"]:  # a deviation from the spec, off by default (see the module docstring)
            rho = max(rho, float(s["explore_radius"]))
        post = self._fit_gp(s, xr, rng)
        ys = self._explore(f, post, xr, rho, int(s["refresh_candidates"]), int(s["refresh_pick"]), rng)
        xh, yh = self._history()
        nu, scale = rffm.fit_local(rff, xh, yh, xr, max_points=int(s["rff_points"]), jitter=float(s["rff_jitter"]))
        self.own_nu = scale * nu
        self._prune(xr, int(s["history_points"]))
        metrics: dict[str, float] = {"queries": int(f.queries), "history": len(self.xs),
                                     "rff_gp_cosine": _cos(rff.grad(xr, self.own_nu), post.grad_mean(xr)),
                                     "rho_given": float(s.get("rho", 0.0)), "rho_used": rho,
                                     "refresh_tie_fraction": sum(y == y_r for y in ys) / len(ys) if ys else 0.0}
        if f.has_grad:
            metrics["rff_cosine"] = _cos(rff.grad(xr, self.own_nu), f.true_grad(xr))
        return LearnResult({"nu": self.own_nu.astype(np.float32)}, samples, metrics)
