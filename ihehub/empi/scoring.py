"""Match scoring profiles: Fellegi–Sunter log-likelihood weights (default) and the tenders' weighted profile.

**Fellegi–Sunter** (Fellegi & Sunter 1969; Winkler 1988 for EM): for each field and agreement level ``k``,
``m_k = P(level k | same person)`` and ``u_k = P(level k | different people)``; the pair's weight is
``Σ log2(m_k / u_k)`` over the fields present on both sides.  ``m`` and ``u`` come from `estimate`, the EM
algorithm over the comparison vectors of candidate pairs (conditional independence of fields), and every
value can be overridden in configuration.  Two thresholds on the weight: at or above ``link`` the record is
linked automatically, at or above ``review`` a review item is opened, below it the record stays on its own.
``probability`` is the posterior ``P(match | γ)`` with the estimated share of matches ``λ``.

**Tenders' profile** (the weighted similarity that Chinese hospital EMPI tenders specify): name 40 %,
birth date 20 %, age 20 %, sex 10 %, department 10 %; a pair above 60 % is a suspected duplicate (review).
Weights of fields missing on either side are left out and the rest rescaled, so that a pair is not
penalised for what nobody recorded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from ihehub.empi.compare import FIELDS, LEVELS, MISSING, Comparison
from ihehub.empi.errors import InvalidData
from ihehub.empi.model import FieldScore
from ihehub.empi.normalize import NormRecord

_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FieldParams:
    """m and u probabilities of each agreement level of one field (each tuple sums to 1)."""

    m: tuple[float, ...]
    u: tuple[float, ...]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FSParameters:
    """Fellegi–Sunter parameters: per-field m/u and the prior share of matches among candidate pairs."""

    fields: Mapping[str, FieldParams]
    prior: float = 0.01
    source: str = "default"  # default, em (estimated from the index), config

    def to_json(self) -> dict[str, Any]:
        return {"prior": self.prior, "source": self.source,
                "fields": {f: {"m": list(p.m), "u": list(p.u)} for f, p in self.fields.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FSParameters:
        fields = {f: FieldParams(m=tuple(v["m"]), u=tuple(v["u"])) for f, v in data.get("fields", {}).items()}
        return cls(fields=_complete(fields), prior=float(data.get("prior", 0.01)),
                   source=str(data.get("source", "config")))

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Sequence[float]]]) -> FSParameters:
        """These parameters with some fields' ``m`` and/or ``u`` replaced (configuration); checked."""
        fields = dict(self.fields)
        for name, values in overrides.items():
            if name not in LEVELS:
                raise InvalidData(f"unknown matching field {name!r}; fields are {', '.join(FIELDS)}",
                                  field=f"matching.{name}")
            cur = fields[name]
            m = tuple(float(x) for x in values.get("m", cur.m))
            u = tuple(float(x) for x in values.get("u", cur.u))
            _check_levels(name, m, "m")
            _check_levels(name, u, "u")
            fields[name] = FieldParams(m=m, u=u)
        return dataclasses.replace(self, fields=MappingProxyType(fields), source="config" if overrides else self.source)

    def weights(self) -> dict[str, tuple[float, ...]]:
        return {f: tuple(math.log2(max(m, _EPS) / max(u, _EPS)) for m, u in zip(p.m, p.u, strict=True))
                for f, p in self.fields.items()}


def _check_levels(name: str, probs: tuple[float, ...], which: str) -> None:
    n = len(LEVELS[name])
    if len(probs) != n or any(not 0 < p < 1 for p in probs) or abs(sum(probs) - 1) > 0.01:
        raise InvalidData(f"{which} of {name!r} must be {n} probabilities in (0, 1) summing to 1 "
                          f"(levels {', '.join(LEVELS[name])}), got {list(probs)}", field=f"matching.{name}.{which}")


# Starting values: m from typical error rates of registration data, u from value frequencies of a population
# index.  EM (`estimate`) replaces both from the index's own data.
DEFAULT_PARAMETERS = FSParameters(
    fields=MappingProxyType(
        {
            "family": FieldParams(m=(0.88, 0.06, 0.03, 0.03), u=(0.01, 0.01, 0.03, 0.95)),
            "given": FieldParams(m=(0.85, 0.07, 0.04, 0.04), u=(0.003, 0.004, 0.02, 0.973)),
            "birth_date": FieldParams(m=(0.92, 0.04, 0.02, 0.02), u=(0.0002, 0.0008, 0.02, 0.979)),
            "sex": FieldParams(m=(0.98, 0.02), u=(0.5, 0.5)),
            "national_id": FieldParams(m=(0.95, 0.03, 0.02), u=(0.00001, 0.0001, 0.99989)),
            "phone": FieldParams(m=(0.70, 0.05, 0.25), u=(0.0005, 0.001, 0.9985)),
            "line1": FieldParams(m=(0.70, 0.12, 0.05, 0.13), u=(0.001, 0.002, 0.02, 0.977)),
            "line2": FieldParams(m=(0.65, 0.12, 0.05, 0.18), u=(0.005, 0.005, 0.03, 0.96)),
            "city": FieldParams(m=(0.85, 0.07, 0.08), u=(0.02, 0.01, 0.97)),
            "state": FieldParams(m=(0.95, 0.05), u=(0.3, 0.7)),
            "postcode": FieldParams(m=(0.85, 0.07, 0.08), u=(0.005, 0.02, 0.975)),
            "mother_maiden_name": FieldParams(m=(0.85, 0.08, 0.07), u=(0.005, 0.01, 0.985)),
        }
    ),
    prior=0.01,
)


def _complete(fields: Mapping[str, FieldParams]) -> Mapping[str, FieldParams]:
    out = dict(DEFAULT_PARAMETERS.fields)
    out.update({f: p for f, p in fields.items() if f in LEVELS and len(p.m) == len(LEVELS[f])})
    return MappingProxyType(out)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Scored:
    score: float
    probability: float
    fields: tuple[FieldScore, ...]


class Profile(Protocol):
    """A way to score a compared pair, with its two thresholds."""

    name: str
    link_threshold: float
    review_threshold: float

    def score(self, cmp: Comparison, a: NormRecord, b: NormRecord) -> Scored: ...

    def rank(self, cmp: Comparison, a: NormRecord, b: NormRecord) -> float:
        """``score(cmp, a, b).score`` alone, without the explanation (to pick the best of many)."""
        ...


def decide(profile: Profile, score: float) -> str:
    """``"link"`` at or above the auto-link threshold, ``"review"`` at or above the review one, else ``"none"``."""
    if score >= profile.link_threshold:
        return "link"
    if score >= profile.review_threshold:
        return "review"
    return "none"


class FellegiSunter:
    """The default profile: sum of log2(m/u) weights; thresholds in bits."""

    name = "fellegi-sunter"

    def __init__(self, params: FSParameters = DEFAULT_PARAMETERS, *, link: float = 16.0, review: float = 8.0) -> None:
        if review > link:
            raise InvalidData(f"review threshold {review} is above the auto-link threshold {link}",
                              field="matching.review_threshold")
        self.params = params
        self.link_threshold = link
        self.review_threshold = review
        self._weights = [params.weights()[f] for f in FIELDS]
        self._prior_logit = math.log2(params.prior / (1 - params.prior))

    def rank(self, cmp: Comparison, a: NormRecord, b: NormRecord) -> float:
        w = self._weights
        return round(sum(w[i][lvl] for i, lvl in enumerate(cmp.levels) if lvl != MISSING), 3)

    def score(self, cmp: Comparison, a: NormRecord, b: NormRecord) -> Scored:
        total = 0.0
        out = []
        for i, lvl in enumerate(cmp.levels):
            if lvl == MISSING:
                continue
            w = self._weights[i][lvl]
            total += w
            out.append(FieldScore(field=FIELDS[i], level=cmp.level_name(i),
                                  similarity=round(cmp.similarities[i], 4), weight=round(w, 3)))
        logit = total + self._prior_logit
        prob = 1.0 / (1.0 + 2.0 ** (-logit)) if logit > -1000 else 0.0
        return Scored(score=round(total, 3), probability=round(prob, 6), fields=tuple(out))


TENDERS_WEIGHTS = MappingProxyType({"name": 0.40, "birth_date": 0.20, "age": 0.20, "sex": 0.10, "department": 0.10})


class Weighted:
    """The tenders' profile: a weighted mean of field similarities in [0, 1]; thresholds are fractions."""

    name = "tenders"

    def __init__(self, weights: Mapping[str, float] = TENDERS_WEIGHTS, *, link: float = 0.90,
                 review: float = 0.60, today: dt.date | None = None) -> None:
        unknown = set(weights) - set(TENDERS_WEIGHTS)
        if unknown:
            raise InvalidData(f"unknown weighted field(s) {sorted(unknown)}; fields are {sorted(TENDERS_WEIGHTS)}",
                              field="matching.weights")
        if review > link:
            raise InvalidData(f"review threshold {review} is above the auto-link threshold {link}",
                              field="matching.review_threshold")
        self.weights = dict(weights)
        self.link_threshold = link
        self.review_threshold = review
        self._year = (today or dt.date.today()).year

    def rank(self, cmp: Comparison, a: NormRecord, b: NormRecord) -> float:
        return self.score(cmp, a, b).score

    def score(self, cmp: Comparison, a: NormRecord, b: NormRecord) -> Scored:
        sims: dict[str, tuple[str, float] | None] = {}
        fam, giv = (cmp.levels[0], cmp.similarities[0]), (cmp.levels[1], cmp.similarities[1])
        present = [s for lvl, s in (fam, giv) if lvl != MISSING]
        sims["name"] = ("mean", sum(present) / len(present)) if present else None
        i = FIELDS.index("birth_date")
        sims["birth_date"] = None if cmp.levels[i] == MISSING else (cmp.level_name(i), cmp.similarities[i])
        if a.birth_year and b.birth_year:
            diff = abs((self._year - a.birth_year) - (self._year - b.birth_year))
            sims["age"] = (f"{diff} years apart", max(0.0, 1.0 - diff / 4))
        else:
            sims["age"] = None
        i = FIELDS.index("sex")
        sims["sex"] = None if cmp.levels[i] == MISSING else (cmp.level_name(i), cmp.similarities[i])
        if a.department and b.department:
            sims["department"] = ("same" if a.department == b.department else "different",
                                  1.0 if a.department == b.department else 0.0)
        else:
            sims["department"] = None
        if sims["name"] is None:
            return Scored(score=0.0, probability=0.0, fields=())
        used = {f: w for f, w in self.weights.items() if sims.get(f) is not None}
        total_w = sum(used.values()) or 1.0
        out = []
        score = 0.0
        for f, w in used.items():
            level, sim = sims[f]  # type: ignore[misc]
            share = w / total_w * sim
            score += share
            out.append(FieldScore(field=f, level=level, similarity=round(sim, 4), weight=round(share, 4)))
        return Scored(score=round(score, 4), probability=round(score, 4), fields=tuple(out))


# -- EM estimation -------------------------------------------------------------------------------

def u_from_random_pairs(levels: Iterable[Sequence[int]], init: FSParameters = DEFAULT_PARAMETERS, *,
                        strength: float = 10.0) -> dict[str, tuple[float, ...]]:
    """u of every field from comparison vectors of random record pairs (almost all of them different people).

    The level frequencies, smoothed by ``strength`` pseudo-pairs distributed as the starting u.  This is the
    usual way to get u without labels (as Splink does): random pairs are the population of non-matches.
    """
    g = np.asarray(list(levels) if not isinstance(levels, np.ndarray) else levels, dtype=np.int16)
    out = {}
    for j, f in enumerate(FIELDS):
        col = g[:, j] if g.ndim == 2 and g.shape[0] else np.zeros(0, dtype=np.int16)
        col = col[col >= 0]
        prior = np.array(init.fields[f].u)
        counts = np.array([(col == k).sum() for k in range(len(LEVELS[f]))], dtype=float)
        est = np.clip((counts + strength * prior) / (counts.sum() + strength), _EPS, 1 - _EPS)
        out[f] = tuple(round(float(x), 8) for x in est / est.sum())
    return out


def estimate(levels: Iterable[Sequence[int]], init: FSParameters = DEFAULT_PARAMETERS, *,
             max_iter: int = 200, tol: float = 1e-6, strength: float = 10.0) -> FSParameters:
    """Estimate m, u and the prior by EM over comparison vectors of candidate pairs (levels, -1 missing).

    Winkler (1988), "Using the EM algorithm for weight computation in the Fellegi–Sunter model of record
    linkage".  On blocked candidate pairs the u found is that of blocked pairs, not of the population
    (`ihehub.empi.batch.train` says which to keep for scoring).  Each estimate is smoothed with ``strength``
    pseudo-pairs distributed as the starting values (a Dirichlet prior), so that a level never seen in the
    sample keeps a sensible weight.  Fields never present keep their starting values.  Needs pairs of both
    kinds: the caller samples blocked candidate pairs.
    """
    g = np.asarray(list(levels) if not isinstance(levels, np.ndarray) else levels, dtype=np.int16)
    if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] != len(FIELDS):
        raise InvalidData(f"EM needs a non-empty matrix of {len(FIELDS)} levels per pair", field="pairs")
    lam = min(max(init.prior, 1e-4), 0.5)
    m0 = [np.array(init.fields[f].m, dtype=float) for f in FIELDS]
    u0 = [np.array(init.fields[f].u, dtype=float) for f in FIELDS]
    m = [x.copy() for x in m0]
    u = [x.copy() for x in u0]
    present = [g[:, j] >= 0 for j in range(len(FIELDS))]
    idx = [np.where(present[j], g[:, j], 0) for j in range(len(FIELDS))]
    onehot = [[g[:, j] == k for k in range(len(LEVELS[f]))] for j, f in enumerate(FIELDS)]
    for _ in range(max_iter):
        lm = np.zeros(g.shape[0])
        lu = np.zeros(g.shape[0])
        for j in range(len(FIELDS)):
            lm += np.where(present[j], np.log(m[j][idx[j]]), 0.0)
            lu += np.where(present[j], np.log(u[j][idx[j]]), 0.0)
        a = math.log(lam) + lm
        b = math.log1p(-lam) + lu
        top = np.maximum(a, b)
        w = np.exp(a - top) / (np.exp(a - top) + np.exp(b - top))
        new_lam = float(np.clip(w.mean(), 1e-6, 1 - 1e-6))
        delta = abs(new_lam - lam)
        for j, f in enumerate(FIELDS):
            if not present[j].any():
                continue
            wm, wu = w[present[j]].sum(), (1 - w)[present[j]].sum()
            nl = len(LEVELS[f])
            new_m = np.array([(w[onehot[j][k]].sum() + strength * m0[j][k]) / (wm + strength) for k in range(nl)])
            new_u = np.array([((1 - w)[onehot[j][k]].sum() + strength * u0[j][k]) / (wu + strength)
                              for k in range(nl)])
            new_m = np.clip(new_m, _EPS, 1 - _EPS)
            new_u = np.clip(new_u, _EPS, 1 - _EPS)
            delta = max(delta, float(np.abs(new_m - m[j]).max()), float(np.abs(new_u - u[j]).max()))
            m[j], u[j] = new_m / new_m.sum(), new_u / new_u.sum()
        lam = new_lam
        if delta < tol:
            break
    fields = {f: FieldParams(m=tuple(round(float(x), 8) for x in m[j]), u=tuple(round(float(x), 8) for x in u[j]))
              for j, f in enumerate(FIELDS)}
    return FSParameters(fields=MappingProxyType(fields), prior=round(lam, 8), source="em")
