"""Where a batch's running-audit verdict is kept: the fragment's manifest and the model configuration's prior.

The running audit (``fragment.audit``) is the held-out confirmation moved into
the user's batch (issue #26).  What it found must outlive the batch: the
fragment's manifest says how the fragment fared on each batch that audited it
(``quality.audits``, the latest ``format.store.KEPT_AUDITS``: a stranger who
receives the file sees it too), and the prior of the batch's model
configuration records the verdict as a judged try, so the next prompt on that
configuration starts from it (``prior.record_audit``).

Pure core: no ComfyUI.  BatchGenerator calls :func:`keep_audit_outcome` once per
audited batch.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from ...errors import FragmentError
from ..audit import AuditedBatch, AuditRule
from ..format.store import record_batch_audit
from .prior import PriorPlace, manifest_candidate, record_audit

log = logging.getLogger(__name__)

#: Failed audited images listed by index in a manifest record (the rest are counted): a batch of 4096 stays small.
LISTED_FAILURES = 32


def audit_summary(batch: AuditedBatch, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A batch's audit as a manifest keeps it: ``AuditedBatch.record`` without the per-seed records (a long batch
    would swell the file), the first ``LISTED_FAILURES`` failed indices, and the batch's sampler ``settings``.

    >>> from prompt_fragments.fragment.audit import AuditRecord, FULL
    >>> b = AuditedBatch([5, 6, 7], [0] * 3, [FULL, "f", FULL], [AuditRecord(5, 0, "f", True, {}),
    ...                                                          AuditRecord(7, 2, "f", False, {})], every=2)
    >>> s = audit_summary(b, {"steps": 20}); s["audited"], s["passed"], s["failed_at"], s["settings"], "records" in s
    (2, 1, [2], {'steps': 20}, False)
    """
    record = {k: v for k, v in batch.record().items() if k != "records"}
    record["failed_at"] = [r.index for r in batch.records if not r.passed][:LISTED_FAILURES]
    record["settings"] = {k: v for k, v in dict(settings or {}).items() if isinstance(v, (int, float, str, bool))}
    return record


def audit_confirmed(quality: Any) -> bool:
    """Whether an earlier batch's running audit confirmed the fragment: a record in ``quality.audits`` with at least
    ``AuditRule.min_audits`` audits that never switched away (what ``prior.audit_tries`` counts as a pass).  A pick
    extracted untried (confirm in batch) is then led by no audit of its own in later batches.

    >>> audit_confirmed({"audits": [{"audited": 3, "switched_at": None}]}), audit_confirmed({"audits": [{"audited": 2}]})
    (True, False)
    >>> audit_confirmed({"audits": [{"audited": 5, "switched_at": 2}]}), audit_confirmed(None)
    (False, False)
    """
    audits = quality.get("audits") if isinstance(quality, Mapping) else None
    if not isinstance(audits, list):
        return False
    return any(isinstance(a, Mapping) and a.get("switched_at") is None and isinstance(a.get("audited"), int)
               and not isinstance(a.get("audited"), bool) and a["audited"] >= AuditRule().min_audits for a in audits)


def keep_audit_outcome(batch: AuditedBatch, *, judge: str, chosen: Any = None,
                       manifest_path: str | os.PathLike | None = None, manifest_id: str | None = None,
                       prior: PriorPlace | None = None, settings: Mapping[str, Any] | None = None) -> list[str]:
    """Keep an audited batch's verdict in the fragment's manifest (``manifest_path``, when the batch's fragment came
    from a file; ``manifest_id``: ``format.store.manifest_identity`` of the manifest the batch ran) and in ``prior`` (the verdict on ``chosen``, the manifest's
    ``quality.refinement.chosen``, as a try of ``judge``).  Returns what the report says of it; a file that cannot
    be written is logged and said, never raised (the batch stands).  A batch with no audit keeps nothing.

    >>> notes = keep_audit_outcome(batch, judge="latent", chosen=manifest["quality"]["refinement"]["chosen"],  # doctest: +SKIP
    ...                            manifest_path="models/fragments/dog.json", manifest_id=identity, prior=place)
    >>> notes  # doctest: +SKIP
    ['audit kept in the manifest (quality.audits)', 'audit recorded in the prior of this model configuration']
    """
    if not batch.records:
        return []
    notes: list[str] = []
    if manifest_path is not None and manifest_id:
        try:
            record_batch_audit(manifest_path, manifest_id, {**audit_summary(batch, settings), "judge": judge})
            notes.append("audit kept in the manifest (quality.audits)")
        except FragmentError as exc:
            log.warning("audit not kept in the manifest: %s", exc)
            notes.append(f"audit not kept in the manifest: {exc}")
    if prior is not None and manifest_candidate(chosen) is not None:
        if record_audit(prior, chosen, batch, judge) is not None:
            notes.append("audit recorded in the prior of this model configuration")
    return notes
