"""``leanfm search``: recipes under a budget, the Pareto set of the objectives.

One search, step by step:

1. **Space and sampler.** Candidates come from :class:`.space.SearchSpace`; Optuna's NSGA-II
   (multi-objective, seeded) draws them a *generation* at a time (``population`` trials), and a
   generation's results are told back in trial order, so the same seed gives the same trials
   whatever order or executor measured them.
2. **Screening.** The predictor prices each candidate from the config alone
   (:mod:`.screen`); one that cannot meet the budget even with the predictor's slack is
   rejected without running, with the reason.
3. **Two-stage measurement** (successive halving with two rungs): a short quality pass
   (``screen_share`` of the evaluation tokens, quality and memory only) stops a candidate whose
   quality already misses the budget by more than ``stop_margin``; the rest get the full
   protocol. Every measurement is a ``bench`` run against the baseline measured once under the
   same protocol.
4. **Store.** Each trial is claimed, measured and finished in the results store
   (:mod:`.store`), keyed by model content, recipe, dataset, protocol and leanfm version: an
   interrupted search run again continues where it stopped, and a candidate measured before (by
   any search) is reused and counted as cached.
5. **Answer.** Trials whose full measurement meets every constraint are *feasible*; the Pareto
   set of the objectives over them is the result (``search.json``, and one recipe YAML per member
   under ``front/``, ready for ``leanfm compress``).

Other model families (``vit``, ``clip``, ``diffusion``, ``diffusion-pipeline``): the space holds
the methods that apply to the family; the LM predictor does not price them, so nothing is
screened and there is no short pass (one stage, the full protocol); each trial is one ``bench``
run of the baseline and the candidate side by side, since their quality (k-NN accuracy, PSNR of
the samples...) and speed are measured against the baseline of the same run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .. import progress
from ..errors import LeanfmError
from ..measure.protocol import Protocol
from ..metrics import METRICS
from ..recipe import Recipe, load_recipe
from .budget import Constraint, Objective, pareto_front
from .keys import ResultKey, recipe_hash, search_id as make_search_id
from .screen import DERIVED, predicted_metrics, screen
from .space import SearchSpace
from .store import Store

SCHEMA = "leanfm.search/1"


@dataclass
class Search:
    """What to search and how to measure it (``leanfm search``'s flags)."""

    model: str
    space: SearchSpace
    budget: list[Constraint]
    objectives: list[Objective]
    protocol: Protocol
    out: Path
    trials: int = 24
    seed: int = 0
    population: int = 8
    hardware: str = "local"
    store: Path | None = None
    screen_share: float = 0.25
    stop_margin: float = 0.25
    executor: str = "local"  # local | ray
    workers: int = 2  # ray: trials measured at once (each on protocol.threads cores)
    address: str | None = None  # ray: an existing cluster (default: start a local one)
    budget_text: str = ""
    objective_text: str = ""
    calib_dataset: str = "gensim-wiki"
    calib_samples: int | None = None
    calib_seqlen: int | None = None
    warm_start: str = "builtin"  # builtin: built-in recipes (and pairs) the space draws come first (.seeds); none
    family: str = "causal-lm"  # the model's family (models/family.py); only causal LMs are screened and two-staged

    @property
    def lm(self) -> bool:
        return self.family == "causal-lm"

    def validate(self) -> None:
        if not self.objectives:
            raise LeanfmError("--objective needs at least one metric, e.g. decode_tokens_per_s:max,ppl_increase:min")
        if self.trials < 1:
            raise LeanfmError(f"--trials must be at least 1 (got {self.trials})")
        if self.population < 2:
            raise LeanfmError(f"--population must be at least 2 (got {self.population})")
        if self.warm_start not in ("builtin", "none"):
            raise LeanfmError(f"--warm-start must be builtin or none (got {self.warm_start!r})")
        if not 0 < self.screen_share <= 1:
            raise LeanfmError(f"--screen-share must be in (0, 1] (got {self.screen_share})")
        self.protocol.validate()
        groups = set(self.protocol.groups)
        for what, names in (("--objective", [o.metric for o in self.objectives]), ("--budget", [c.metric for c in self.budget])):
            for m in names:
                g = METRICS[m].group
                if g not in groups:
                    raise LeanfmError(f"{what} uses {m}, a {g} metric, but --metrics measures only {', '.join(sorted(groups))}; "
                                      f"add {g} to --metrics")


@dataclass
class Trial:
    number: int
    params: dict
    recipe: Recipe | None = None
    status: str = "pending"  # invalid | rejected | stopped | measured | failed
    reason: str = ""
    predicted: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    stage: int = 0
    cached: bool = False
    feasible: bool = False
    builtin: str | None = None  # the built-in recipe (or a+b) this warm-start trial reproduces
    spread: dict = field(default_factory=dict)  # metric -> [min, max] over the repeats (stage 2)

    def to_dict(self) -> dict:
        return {"trial": self.number, "params": self.params, "recipe": self.recipe.to_dict() if self.recipe else None,
                "builtin": self.builtin, "status": self.status, "reason": self.reason, "predicted": self.predicted, "metrics": self.metrics,
                "stage": self.stage, "cached": self.cached, "feasible": self.feasible, "spread": self.spread}


def _model_path(model: str) -> str | None:
    """The directory whose content identifies ``model`` (an alias's cached checkpoint, a local
    directory), or None for a hub id (identified by its name)."""
    from ..models.cache import build_cache
    from ..models.registry import ALIASES

    if model in ALIASES:
        return str(build_cache(ALIASES[model]))
    p = Path(os.path.expanduser(model))
    return str(p) if p.exists() else None


def _widths(model: str, family: str = "causal-lm") -> dict[str, list[int]]:
    """Input widths of the model's linears that group sizes must divide (empty: not known from
    the config alone; a group size that does not fit then fails that trial, with the reason)."""
    if family in ("vit", "clip"):
        from ..models.cache import build_cache
        from ..models.family import vision_config
        from ..models.registry import ALIASES

        cfg = vision_config(build_cache(ALIASES[model]) if model in ALIASES else os.path.expanduser(model))
        hidden = int(cfg["hidden_size"])
        inter = int(cfg.get("intermediate_size") or hidden * float(cfg.get("mlp_ratio", 4)))  # DINOv2 gives a ratio
        return {"in_features": sorted({hidden, inter})}
    if family != "causal-lm":
        return {}
    from ..predict.arch import load_arch

    a = load_arch(model)
    return {"in_features": sorted({a.hidden, a.intermediate, a.heads * a.head_dim})}


class _Runner:
    """Measures candidates with ``bench`` against the baseline of each stage's protocol."""

    def __init__(self, s: Search, store: Store, model_hash: str, sid: str):
        self.s, self.store, self.model_hash, self.sid = s, store, model_hash, sid
        full = s.protocol
        short_tokens = max(full.seqlen, int((full.max_eval_tokens or 300_000) * s.screen_share))
        self.protocols = {1: dataclasses.replace(full, max_eval_tokens=short_tokens, groups=("quality", "memory")), 2: full}
        self.baseline_dirs: dict[int, Path] = {}

    def _calib(self, proto: Protocol):
        """Calibration as ``bench`` sizes it for the stage's tokens, unless --calib-samples/--calib-seqlen say."""
        from ..bench import auto_calibration_size
        from ..data.calib import calibration

        n, seqlen = auto_calibration_size(proto.max_eval_tokens)
        c = calibration(self.s.calib_dataset, self.s.calib_samples or n, self.s.calib_seqlen or seqlen, data_dir=proto.data_dir)
        c.sizing = ("set by --calib-samples/--calib-seqlen" if self.s.calib_samples or self.s.calib_seqlen
                    else f"scaled to this stage's {proto.max_eval_tokens} evaluation tokens")
        return c

    def bench_one(self, recipe: Recipe, stage: int, out: Path, trial: int | None = None) -> dict:
        from ..bench import bench

        proto = self.protocols[stage]
        key = ResultKey.of(self.model_hash, recipe, {**proto.to_dict(), "stage": stage})
        hit = self.store.get(key)
        if hit is not None:
            return {**hit, "_cached": True, "_key": key}
        if not self.s.lm:  # quality and speed against the baseline of the same run, side by side
            res = bench(self.s.model, [load_recipe("baseline"), recipe], proto, out, overwrite=True)
        else:
            base = self.baseline_dirs.get(stage)
            res = bench(self.s.model, [recipe], proto, out, calib=self._calib(proto), reuse_baseline=base, overwrite=True,
                        profile_path=None)
        run = res["runs"][-1]
        if run.get("status") == "error":
            raise LeanfmError(run.get("error", "measurement failed"))
        if stage == 1:  # kept at once: a search killed before stage 2 finds it again (stage 2 is stored with its trial)
            self.store.put(key, run, self.sid, trial)
        return {**run, "_cached": False, "_key": key}

    def baseline(self, stage: int) -> dict:
        out = self.s.out / f"baseline-stage{stage}"
        if (out / "results.json").exists():
            self.baseline_dirs[stage] = out
            return json.loads((out / "results.json").read_text())["runs"][0]
        from ..bench import bench

        proto = self.protocols[stage]
        progress.info(f"search: measuring the baseline under the stage-{stage} protocol")
        res = bench(self.s.model, [load_recipe("baseline")], proto, out, calib=self._calib(proto) if self.s.lm else None,
                    overwrite=True)
        self.baseline_dirs[stage] = out
        return res["runs"][0]


def _check_reachable(s: Search, widths, base_pred: dict, samples: int = 300) -> None:
    """Refuse a budget no candidate of the space can meet by the predictor, naming the best
    predicted value of the constraint that fails most often."""
    from ..predict.analyzer import predict
    from ..space import RandomSampler

    predicted = [c for c in s.budget if c.metric in base_pred or c.metric in DERIVED]
    if not predicted or not s.lm:
        return
    best: dict[str, float] = {}
    for i in range(samples):
        try:
            r = s.space.sample(RandomSampler(s.seed * 1000 + i), widths, name=f"probe{i}")
            p = predicted_metrics(predict(s.model, r, s.hardware, s.protocol.batch, s.protocol.prompt, s.protocol.gen), base_pred)
        except LeanfmError:
            continue
        if screen(s.budget, p, base_pred, {}) is None:
            return
        for c in predicted:
            if c.metric in p:
                v = p[c.metric] / base_pred[c.metric] if c.relative and base_pred.get(c.metric) else p[c.metric]
                better = min if c.op in ("<=", "<") else max
                best[str(c)] = better(best.get(str(c), v), v)
    if best:
        shown = "; ".join(f"{k}: best predicted {v:.4g}{'x' if 'x' in k else ''}" for k, v in best.items())
        raise LeanfmError(f"no candidate of this search space can meet --budget by the predictor ({samples} drawn): {shown}; "
                          "relax the budget or widen the space (--methods / --space)")


def run_search(s: Search) -> dict:
    """Run the search (resuming one interrupted in the same store) and return search.json's content."""
    import optuna
    from optuna.trial import TrialState

    from ..models.cache import cache_root

    s.validate()
    s.out.mkdir(parents=True, exist_ok=True)
    store = Store(s.store or (cache_root() / "results.sqlite"))
    mpath = _model_path(s.model)
    mhash = store.model_hash(mpath) if mpath else f"name:{s.model}"
    space_desc = {m: {p: str(d) for p, d in dims.items()} for m, dims in s.space.dims.items()}
    sid = make_search_id(mhash, {"space": space_desc, "require": list(s.space.require), "protocol": s.protocol.to_dict(),
                                 "population": s.population, "warm_start": s.warm_start},
                         [str(c) for c in s.budget], [str(o) for o in s.objectives], s.seed)
    widths = _widths(s.model, s.family)
    base_pred = _price(s, "baseline")
    _check_reachable(s, widths, base_pred)

    pool = None
    if s.executor == "ray":  # before any measurement: a missing Ray or a wrong --address fails in seconds
        from .executors import RayPool

        pool = RayPool(s.workers, s.protocol.threads, s.address)
    try:
        runner = _Runner(s, store, mhash, sid)
        if s.lm:  # other families have one stage: no short pass
            runner.baseline(1)
        base_full = runner.baseline(2)
        base_metrics = base_full["metrics"]

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        # NSGA-II ranks feasible trials (every constraint value <= 0) before infeasible ones
        sampler = optuna.samplers.NSGAIISampler(population_size=s.population, seed=s.seed)
        study = optuna.create_study(directions=["maximize" if o.direction == "max" else "minimize" for o in s.objectives],
                                    sampler=sampler)
        seeds = []
        if s.warm_start == "builtin":
            from .seeds import pick

            seeds = pick(s.space, widths, lambda r: _price(s, r, base_pred), s.budget, base_pred, limit=s.trials // 2)
            for _, params in seeds:
                study.enqueue_trial(params)
            if seeds:
                why = "the predictor lets through" if s.lm else "of this family (not screened: no predictor in search)"
                progress.info(f"search: warm start with {len(seeds)} built-in recipes {why}: {', '.join(n for n, _ in seeds)}")
        worker = f"{socket.gethostname()}:{os.getpid()}"
        trials: list[Trial] = []
        drawn = counted = 0
        slot: dict[int, int] = {}  # draw number -> trial number shown (draws not run are not trials)
        while counted < s.trials:
            batch, screened = [], []  # to measure; rejected by the predictor (told with the batch, in draw order)
            while len(batch) < s.population and counted < s.trials:
                if drawn >= MAX_DRAWS_PER_TRIAL * s.trials:
                    break
                ot = study.ask()
                t = _draw(s, ot, drawn, widths, base_pred)
                if drawn < len(seeds):  # enqueued trials are asked first, in order
                    t.builtin = _reproduces(t, seeds[drawn][0])
                drawn += 1
                if t.status == "invalid":  # cannot run as composed: found in milliseconds, drawn again in its place
                    study.tell(ot, state=TrialState.FAIL)
                    trials.append(t)
                    progress.info(f"search draw {t.number + 1} (not counted as a trial): {_line(t)}")
                    continue
                why = screen(s.budget, t.predicted, base_pred, base_metrics)
                if why:  # cannot meet the budget by the predictor: not run, not counted, told as infeasible
                    t.status, t.reason = "rejected", why
                    screened.append((ot, t))
                    trials.append(t)
                    progress.info(f"search draw {t.number + 1} (not counted as a trial): {_line(t)}")
                    continue
                counted += 1
                slot[t.number] = counted
                batch.append((ot, t))
            # measure the generation (claims make a resumed or shared run skip finished ones)
            if pool is None:
                measured = []
                for _, t in batch:
                    _measure(s, t, store, runner, sid, worker, base_pred, base_metrics)
                    measured.append(t)
                    progress.info(f"search trial {slot[t.number]}/{s.trials}: {_line(t, s.objectives)}")
            elif batch:
                measured = pool.map([t for _, t in batch], (s, store.path, mhash, sid, base_pred, base_metrics, runner.baseline_dirs))
                for t in measured:
                    progress.info(f"search trial {slot[t.number]}/{s.trials}: {_line(t, s.objectives)}")
            else:
                measured = []
            trials.extend(measured)
            # tell in draw order: the next generation does not depend on who finished first
            told_now = sorted([(ot, t) for (ot, _), t in zip(batch, measured)] + screened, key=lambda p: p[1].number)
            for ot, t in told_now:
                told = _sampler_view(t, s, base_pred, base_metrics)
                if told is None:
                    study.tell(ot, state=TrialState.FAIL)
                    continue
                values, violations = told
                for i, (c, v) in enumerate(zip(s.budget, violations)):
                    ot.set_constraint(f"{i}:{c}", v)
                study.tell(ot, values)
            if drawn >= MAX_DRAWS_PER_TRIAL * s.trials and counted < s.trials:
                progress.info(f"search: stopped drawing after {drawn} candidates ({counted} run); narrow the space "
                              "(--methods / --space) or relax --budget")
                break
        return _finish(s, trials, runner, sid, base_metrics, store)
    finally:
        if pool is not None:
            pool.close()


MAX_DRAWS_PER_TRIAL = 20  # invalid and rejected draws are nearly free, but a space that yields almost nothing else is a user error


def _price(s: Search, recipe, base_pred: dict | None = None) -> dict:
    """The predicted metrics of ``recipe`` (LeanfmError where the composition cannot run); empty
    for a family the LM roofline does not price (nothing to screen by)."""
    if not s.lm:
        return {}
    from ..predict.analyzer import predict

    return predicted_metrics(predict(s.model, recipe, s.hardware, s.protocol.batch, s.protocol.prompt, s.protocol.gen),
                             base_pred)


def _draw(s: Search, ot, number: int, widths, base_pred: dict) -> Trial:
    """One candidate from the sampler, priced by the predictor; ``invalid`` when a config refuses
    the drawn values or the predictor finds the composition cannot run (a width a later step
    cannot pack), with the reason."""
    t = Trial(number, {})
    try:
        t.recipe = s.space.sample(ot, widths, name=f"t{number:03d}")
    except LeanfmError as e:
        t.status, t.reason = "invalid", str(e)
    t.params = dict(ot.params)
    if t.recipe is not None:
        try:  # the baseline was priced, so an error here is the recipe's own
            t.predicted = _price(s, t.recipe, base_pred)
        except LeanfmError as e:
            t.status, t.reason = "invalid", f"predictor: {e}"
    return t


def _reproduces(t: Trial, name: str) -> str | None:
    """``name`` when the drawn trial's steps are exactly that built-in's (else None, said once)."""
    same = t.recipe is not None and [x.to_dict() for x in t.recipe.steps] == [x.to_dict() for x in load_recipe(name).steps]
    if not same:
        progress.info(f"search: warm-start trial {t.number + 1} was meant to reproduce {name} but was drawn differently")
    return name if same else None


def _sampler_view(t: Trial, s: Search, base_pred: dict, base_metrics: dict) -> tuple[list[float], list[float]] | None:
    """What NSGA-II is told of a trial: objective values and one violation per budget bound
    (> 0: missed by that fraction), or None (told as failed).

    A measured trial gives its measurements. A trial rejected by the predictor or stopped after
    the short pass is told too, as infeasible by what is known of it (the measured short-pass
    metrics first, else the prediction, relative bounds against the predicted baseline): NSGA-II
    ranks infeasible trials by their summed violation alone (Deb's constrained domination), so the
    next generation breeds from the candidates nearest the budget instead of ignoring them; their
    objective values (the prediction, else the baseline's) only break ties among equals."""
    if t.status == "measured":
        values = [t.metrics.get(o.metric) for o in s.objectives]
        if any(v is None for v in values):
            return None
        return values, [c.violation(t.metrics, base_metrics) or 0.0 for c in s.budget]
    if t.status not in ("rejected", "stopped"):
        return None
    violations = []
    for c in s.budget:
        if c.metric in t.metrics:
            v = c.violation(t.metrics, base_metrics)
        elif c.metric in t.predicted:
            v = c.violation(t.predicted, base_pred if c.relative else base_metrics)
        else:
            v = None
        violations.append(v or 0.0)
    if not any(v > 0 for v in violations):  # told infeasible whatever the numbers say: it was not run to the end
        violations = [v + 1e-6 for v in violations]
    values = [_number_or(t.metrics.get(o.metric), t.predicted.get(o.metric), base_metrics.get(o.metric)) for o in s.objectives]
    return (values, violations) if all(v is not None for v in values) else None


def _number_or(*vals) -> float | None:
    return next((float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)), None)


def measure_in_worker(t: "Trial", s: "Search", store_path, mhash: str, sid: str, base_pred: dict, base_metrics: dict,
                      baseline_dirs: dict) -> "Trial":
    """One trial in an executor's worker process (its own store connection and runner)."""
    import torch

    torch.set_num_threads(s.protocol.threads)
    store = Store(store_path)
    runner = _Runner(s, store, mhash, sid)
    runner.baseline_dirs = dict(baseline_dirs)
    _measure(s, t, store, runner, sid, f"{socket.gethostname()}:{os.getpid()}", base_pred, base_metrics)
    store.close()
    return t


def _measure(s: Search, t: Trial, store: Store, runner: _Runner, sid: str, worker: str,
             base_pred: dict, base_metrics: dict) -> None:
    rh = recipe_hash(t.recipe.to_dict())
    prev = None if store.claim(sid, t.number, t.params, rh, worker) else _wait_finished(store, sid, t.number, worker)
    if prev is not None:
        res = prev.get("result") or {}
        t.status = res.get("status") or ("rejected" if prev.get("state") == "rejected" else "failed")
        t.reason = res.get("reason") or prev.get("reason") or ""
        t.metrics, t.stage, t.predicted = res.get("metrics", {}), res.get("stage", 0), res.get("predicted", {})
        t.feasible, t.cached, t.spread = res.get("feasible", False), True, res.get("spread", {})
        return
    try:
        out = s.out / "trials" / f"t{t.number:03d}"
        missed = []
        if s.lm:  # the short quality pass (causal LMs: a share of the evaluation tokens)
            r1 = runner.bench_one(t.recipe, 1, out / "stage1", t.number)
            t.stage, t.metrics, t.cached = 1, r1["metrics"], r1["_cached"]
            quality = [c for c in s.budget if METRICS[c.metric].group == "quality"]
            missed = [c for c in quality if (c.violation(t.metrics, base_metrics) or 0) > s.stop_margin]
        else:
            t.cached = True  # and-ed with stage 2's below
        if missed:
            t.status, t.reason = "stopped", f"short quality pass: {missed[0].metric} {t.metrics.get(missed[0].metric):.4g} misses {missed[0]} by more than {s.stop_margin:.0%}"
            store.finish(sid, t.number, result=_result(t))  # its stage-1 run is already in the store
            return
        r2 = runner.bench_one(t.recipe, 2, out / "stage2", t.number)
        t.stage, t.metrics, t.cached = 2, r2["metrics"], t.cached and r2["_cached"]
        t.spread = _spread(r2.get("details", {}), s.objectives)
        t.status = "measured"
        t.feasible = all(c.holds(t.metrics, base_metrics) for c in s.budget)
        if r2["_cached"]:  # measured before (another trial drew the same recipe): nothing new to store or log
            store.finish(sid, t.number, result=_result(t))
        else:
            store.finish(sid, t.number, result=_result(t), key=r2["_key"], run=_plain_run(r2))
    except LeanfmError as e:
        t.status, t.reason = "failed", str(e)
        store.fail(sid, t.number, str(e))


def _wait_finished(store: Store, sid: str, number: int, worker: str, poll_s: float = 2.0) -> dict | None:
    """The stored trial once finished (another worker may still be measuring it), or None when
    its worker died and this one has taken the claim over (then measure it here)."""
    import time

    while True:
        prev = next((x for x in store.trials(sid) if x["trial"] == number), None) or {}
        if prev.get("state") != "claimed":
            return prev
        if store.claim(sid, number, prev["params"], prev["recipe"], worker):
            return None
        time.sleep(poll_s)


def _line(t: Trial, objectives: list[Objective] = ()) -> str:
    head = f"{t.recipe.to_dict()['steps'] if t.recipe else t.params} -> {t.status}"
    if t.status == "measured":
        keys = {"ppl_increase", "weight_bytes", "decode_tokens_per_s", *(o.metric for o in objectives)}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in t.metrics.items() if k in keys and isinstance(v, (int, float)))
        return f"{head} ({shown}{'; feasible' if t.feasible else '; misses the budget'}{'; cached' if t.cached else ''})"
    return f"{head}: {t.reason}" if t.reason else head


def _plain_run(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def _result(t: Trial) -> dict:
    return {"status": t.status, "reason": t.reason, "metrics": t.metrics, "stage": t.stage, "predicted": t.predicted,
            "feasible": t.feasible, "spread": t.spread}


def _spread(details: dict, objectives: list[Objective]) -> dict:
    """[min, max] over the repeats of each objective the run measured more than once."""
    out = {}
    for o in objectives:
        lo, hi = details.get(f"{o.metric}_min"), details.get(f"{o.metric}_max")
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            out[o.metric] = [lo, hi]
    return out


def _finish(s: Search, trials: list[Trial], runner: _Runner, sid: str, base_metrics: dict, store: Store) -> dict:
    trials = sorted(trials, key=lambda t: t.number)
    feasible = [t for t in trials if t.status == "measured" and t.feasible]
    front = [feasible[i] for i in pareto_front([t.metrics for t in feasible], s.objectives, [t.spread for t in feasible])]
    (s.out / "front").mkdir(exist_ok=True)
    for t in front:
        t.recipe.name = f"search-t{t.number:03d}"
        t.recipe.save(s.out / "front" / f"{t.recipe.name}.yaml")
    counts = {k: sum(t.status == k for t in trials) for k in ("rejected", "invalid", "stopped", "measured", "failed")}
    result = {"schema": SCHEMA, "search_id": sid, "model": s.model, "budget": [str(c) for c in s.budget],
              "objectives": [str(o) for o in s.objectives], "seed": s.seed, "trials_requested": s.trials,
              "population": s.population, "protocol": s.protocol.to_dict(), "hardware": s.hardware, "executor": s.executor,
              "counts": counts, "measured_now": sum(t.status in ("measured", "stopped") and not t.cached for t in trials),
              "cached": sum(t.status in ("measured", "stopped") and t.cached for t in trials),
              "baseline": base_metrics, "trials": [t.to_dict() for t in trials],
              "front": [t.number for t in front]}
    tmp = s.out / "search.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(s.out / "search.json")
    return result
