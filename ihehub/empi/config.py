"""EMPI settings: the enterprise identifier domain, the matching profile and its thresholds, m/u overrides.

A plain frozen dataclass so that the hub's YAML loader (``ihehub.config``) can build it from the
``empi:`` section; `EmpiConfig.from_mapping` does that with clear errors naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ihehub.empi.errors import InvalidData
from ihehub.empi.scoring import (
    DEFAULT_PARAMETERS,
    TENDERS_WEIGHTS,
    FellegiSunter,
    FSParameters,
    Profile,
    Weighted,
)

PROFILES = ("fellegi-sunter", "tenders")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EmpiConfig:
    """How the EMPI numbers its patients and decides links.

    * ``enterprise_namespace`` / ``enterprise_oid``: the EMPI's own identifier domain (HD-1 / HD-2);
      enterprise ids are ``epid_prefix`` + the patient number zero-padded to ``epid_width`` digits.
    * ``profile``: ``fellegi-sunter`` (default; thresholds in bits of log-likelihood) or ``tenders``
      (weighted similarity; thresholds as fractions).  ``link_threshold`` / ``review_threshold`` override the
      profile's defaults (16 / 8 bits; 0.90 / 0.60).
    * ``m_u``: per-field overrides ``{"family": {"m": [...], "u": [...]}}`` applied on top of the estimated
      (``use_estimated``: the newest `Empi.train` result) or default parameters.
    * ``same_domain``: a match with a patient that already has a record of the same domain is a duplicate
      inside one source, sent to ``review`` (default) or ``ignore``d; it is never linked automatically.
    * ``max_block``: a blocking key shared by more records is skipped; ``max_reviews`` per record.
    * ``max_candidates``: a record is compared with at most this many candidates: those sharing the most
      blocking keys with it (a person's own records share several: name and year, birth date, hanzi name,
      resident ID, phone; a stranger in a common block one), then those sharing the rarest key.  It bounds
      the work of one feed in a large index; batch `dedupe` and `train` compare every block member.
    * ``strict_national_id``: an invalid resident ID rejects the feed (else: warning, ID ignored).
    """

    enterprise_namespace: str = "IHEHUB"
    enterprise_oid: str | None = None
    epid_prefix: str = "E"
    epid_width: int = 9
    profile: str = "fellegi-sunter"
    link_threshold: float | None = None
    review_threshold: float | None = None
    m_u: Mapping[str, Mapping[str, Sequence[float]]] = dataclasses.field(default_factory=dict)
    tenders_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(TENDERS_WEIGHTS))
    use_estimated: bool = True
    same_domain: str = "review"
    max_block: int = 500
    max_candidates: int = 50
    max_reviews: int = 5
    strict_national_id: bool = True
    find_limit: int = 1000

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise InvalidData(f"unknown matching profile {self.profile!r}; profiles are {', '.join(PROFILES)}",
                              field="empi.profile")
        if self.same_domain not in ("review", "ignore"):
            raise InvalidData(f"same_domain must be review or ignore, not {self.same_domain!r}",
                              field="empi.same_domain")
        if not self.enterprise_namespace:
            raise InvalidData("the enterprise domain needs a namespace", field="empi.enterprise_namespace")
        for name, value in (("epid_width", self.epid_width), ("max_block", self.max_block),
                            ("max_candidates", self.max_candidates),
                            ("max_reviews", self.max_reviews), ("find_limit", self.find_limit)):
            if value < 1:
                raise InvalidData(f"{name} must be at least 1, not {value}", field=f"empi.{name}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EmpiConfig:
        """Build from a configuration mapping (the ``empi:`` section); unknown keys are named."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidData(f"unknown EMPI setting(s) {', '.join(unknown)}; settings are {', '.join(sorted(known))}",
                              field=f"empi.{unknown[0]}")
        return cls(**dict(data))

    def build_profile(self, estimated: FSParameters | None = None) -> Profile:
        """The scoring profile these settings select, on ``estimated`` parameters when allowed."""
        if self.profile == "tenders":
            return Weighted(MappingProxyType(dict(self.tenders_weights)),
                            link=0.90 if self.link_threshold is None else self.link_threshold,
                            review=0.60 if self.review_threshold is None else self.review_threshold)
        base = estimated if (estimated is not None and self.use_estimated) else DEFAULT_PARAMETERS
        params = base.with_overrides(self.m_u) if self.m_u else base
        return FellegiSunter(params, link=16.0 if self.link_threshold is None else self.link_threshold,
                             review=8.0 if self.review_threshold is None else self.review_threshold)
