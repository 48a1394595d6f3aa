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
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ...errors import FragmentError
from ..audit import AuditedBatch, AuditRule
from ..format.store import record_batch_audit
from .index import locked
from .prior import PriorPlace, manifest_candidate, record_audit

log = logging.getLogger(__name__)

#: Failed audited images listed by index in a manifest record (the rest are counted): a batch of 4096 stays small.
LISTED_FAILURES = 32


def audit_summary(batch: AuditedBatch, settings: Mapping[str, Any] | None = None,
                  measured: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A batch's audit as a manifest keeps it: ``AuditedBatch.record`` without the per-seed records (a long batch
    would swell the file), the first ``LISTED_FAILURES`` failed indices, the batch's sampler ``settings``, and
    what the batch ``measured`` of its speed (``raw_ratio``, ``unit_s``: ``metrics.costs.batch_costs``), when given.

    >>> from prompt_fragments.fragment.audit import AuditRecord, FULL
    >>> b = AuditedBatch([5, 6, 7], [0] * 3, [FULL, "f", FULL], [AuditRecord(5, 0, "f", True, {}),
    ...                                                          AuditRecord(7, 2, "f", False, {})], every=2)
    >>> s = audit_summary(b, {"steps": 20}); s["audited"], s["passed"], s["failed_at"], s["settings"], "records" in s
    (2, 1, [2], {'steps': 20}, False)
    """
    record = {k: v for k, v in batch.record().items() if k != "records"}
    record["failed_at"] = [r.index for r in batch.records if not r.passed][:LISTED_FAILURES]
    record["settings"] = {k: v for k, v in dict(settings or {}).items() if isinstance(v, (int, float, str, bool))}
    if measured:
        record["measured"] = {k: float(v) for k, v in measured.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return record


def audit_confirmed(quality: Any) -> bool:
    """Whether the latest batch audit that tested the fragment as picked confirmed it: among the records in
    ``quality.audits`` of batches run as stored, at denoise 1 and (when ``quality.sampler`` names them) on the judged
    sampler settings, the latest has at least ``AuditRule.min_audits`` audits and never switched away (what
    ``prior.audit_tries`` counts as a pass).  A later switch revokes an earlier pass.  A pick extracted untried
    (confirm in batch) is then led by no audit of its own in later batches.

    >>> ok = {"audited": 3, "switched_at": None, "settings": {"schedule": "as stored", "denoise": 1.0}}
    >>> audit_confirmed({"audits": [ok]}), audit_confirmed({"audits": [ok, {**ok, "switched_at": 2}]})
    (True, False)
    >>> audit_confirmed({"audits": [{**ok, "settings": {"schedule": "off", "denoise": 1.0}}]}), audit_confirmed(None)
    (False, False)
    >>> audit_confirmed({"audits": [ok], "sampler": {"sampler_name": "euler", "steps": 20}})  # ran on another one
    False
    """
    audits = quality.get("audits") if isinstance(quality, Mapping) else None
    if not isinstance(audits, list):
        return False
    judged = quality.get("sampler") if isinstance(quality.get("sampler"), Mapping) else {}
    tested = [a for a in audits if isinstance(a, Mapping) and _tested_as_picked(a.get("settings"), judged)]
    if not tested:
        return False
    latest = tested[-1]
    audited = latest.get("audited")
    return ("switched_at" in latest and latest["switched_at"] is None and isinstance(audited, int)
            and not isinstance(audited, bool) and audited >= AuditRule().min_audits)


def _tested_as_picked(settings: Any, judged: Mapping[str, Any]) -> bool:
    if not isinstance(settings, Mapping) or settings.get("schedule") != "as stored" or settings.get("denoise") != 1.0:
        return False
    return all(settings.get(k) == v for k, v in judged.items() if k != "denoise")


def keep_audit_outcome(batch: AuditedBatch, *, judge: str, chosen: Any = None,
                       manifest_path: str | os.PathLike | None = None, manifest_id: str | None = None,
                       prior: PriorPlace | None = None, settings: Mapping[str, Any] | None = None,
                       measured: Mapping[str, Any] | None = None) -> list[str]:
    """Keep an audited batch's verdict in the fragment's manifest (``manifest_path``, when the batch's fragment came
    from a file; ``manifest_id``: ``format.store.manifest_identity`` of the manifest the batch ran) and in ``prior``
    (the verdict on ``chosen``, the manifest's ``quality.refinement.chosen``, as a try of ``judge``).  Returns what the
    report says of it; a file that cannot be written is logged and said, never raised (the batch stands).  A batch
    with no audit keeps nothing; a batch that did not run the fragment as picked (``settings["schedule"]`` other than
    "as stored") keeps its record in the manifest only, never as a verdict on ``chosen`` in the prior.  The manifest
    is rewritten under the library's lock, so no other library writer replaces or evicts it meanwhile.  ``measured``
    (the batch's raw ratio and ``u``) goes into the manifest's record.

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
            with locked(Path(manifest_path).parent):
                record_batch_audit(manifest_path, manifest_id, {**audit_summary(batch, settings, measured),
                                                                         "judge": judge})
            notes.append("audit kept in the manifest (quality.audits)")
        except FragmentError as exc:
            log.warning("audit not kept in the manifest: %s", exc)
            notes.append(f"audit not kept in the manifest: {exc}")
    as_picked = settings is None or settings.get("schedule", "as stored") == "as stored"
    if prior is not None and as_picked and manifest_candidate(chosen) is not None:
        if record_audit(prior, chosen, batch, judge) is not None:
            notes.append("audit recorded in the prior of this model configuration")
    return notes
