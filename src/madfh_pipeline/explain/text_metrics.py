"""Scores for generated explanations against grounded references: n-gram overlap and fact agreement.

Libraries: **sacrebleu** for BLEU and Google's **rouge-score** for ROUGE-L.

- sacrebleu is the maintained reference implementation of BLEU (fixed 13a tokenisation, documented smoothing,
  comparable across papers); ``torchmetrics.text`` would add a torch-metric dependency whose BLEU re-implements the
  same formula and whose ROUGE needs nltk anyway.
- rouge-score is the implementation the ROUGE numbers of the literature (and Hugging Face ``evaluate``) come from; it
  reproduces the original ROUGE-1.5.5 scores. sacrebleu has no ROUGE.

BLEU is reported as a share in [0, 1] (sacrebleu's score / 100) so that every metric here has the same scale;
sentence BLEU uses sacrebleu's default exponential smoothing, corpus BLEU is sacrebleu's ``corpus_bleu`` (not the
mean of sentence BLEUs). ROUGE-L is the F-measure, per item and as the corpus mean.

N-gram overlap rewards fluent copies of the template even when the facts are wrong ("upper left" vs "upper right"
differ by one word), so the facts are also parsed back with the describer's vocabulary
(:func:`~madfh_pipeline.explain.describer.parse_description`) and compared:

- ``normal_agreement``: both say "looks normal", or both report regions;
- ``count_agreement``: the same number of regions is announced;
- ``location_agreement`` / ``size_agreement`` / ``contrast_agreement``: the multiset overlap of the described
  regions' locations (sizes, contrasts): ``sum_label min(n_ref, n_gen) / max(#ref regions, #gen regions)``, 1 when
  both describe no region. Order does not matter; a missing or an extra region lowers it.

A generated text that parses to nothing scores 0 on every agreement (it is counted, never skipped: skipping would
flatter a model that babbles). Both texts go through
:func:`~madfh_pipeline.explain.describer.canonical_text` first (lower case, word-piece spacing undone), because
BLIP's tokenizer is uncased and cannot reproduce the reference's capitals.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

from madfh_pipeline.explain.describer import ParsedDescription, ParsedRegion, canonical_text, parse_description

logger = logging.getLogger(__name__)

AGREEMENTS: tuple[str, ...] = (
    "normal_agreement",
    "count_agreement",
    "location_agreement",
    "size_agreement",
    "contrast_agreement",
)


@dataclass
class TextMetrics:
    """Corpus-level numbers (``corpus``) and one dict per item (``per_item``, in input order)."""

    corpus: dict[str, float]
    per_item: list[dict[str, Any]] = field(default_factory=list)


def _multiset_agreement(ref: Sequence[str | None], gen: Sequence[str | None]) -> float:
    if not ref and not gen:
        return 1.0
    overlap = sum((Counter(ref) & Counter(gen)).values())
    return overlap / max(len(ref), len(gen))


def fact_agreement(reference: ParsedDescription, generated: ParsedDescription | None) -> dict[str, float]:
    """The five agreements of one item (see the module docstring); all 0 when ``generated`` is ``None``."""
    if generated is None:
        return dict.fromkeys(AGREEMENTS, 0.0)

    def labels(regions: Sequence[ParsedRegion], attribute: str) -> list[str | None]:
        return [getattr(r, attribute) for r in regions]

    return {
        "normal_agreement": float(reference.is_normal == generated.is_normal),
        "count_agreement": float(reference.count is not None and reference.count == generated.count),
        "location_agreement": _multiset_agreement(
            labels(reference.regions, "location"), labels(generated.regions, "location")
        ),
        "size_agreement": _multiset_agreement(labels(reference.regions, "size"), labels(generated.regions, "size")),
        "contrast_agreement": _multiset_agreement(
            labels(reference.regions, "contrast"), labels(generated.regions, "contrast")
        ),
    }


def score_explanations(
    generated: Sequence[str], references: Sequence[str], ids: Sequence[str] | None = None
) -> TextMetrics:
    """BLEU, ROUGE-L and fact agreements of ``generated`` against grounded ``references``, per item and corpus-wide.

    ``references`` must be describer texts (they are parsed; operator free text is not a grounded reference and is
    refused). ``ids`` label the per-item rows (default: positions). Corpus values: ``bleu`` (corpus BLEU),
    ``rouge_l`` and every agreement as means over items, ``parse_rate`` (share of generated texts that parse),
    ``n_items``.
    """
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated texts but {len(references)} references.")
    if not references:
        raise ValueError("score_explanations needs at least one item.")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(references))]
    if len(ids) != len(references):
        raise ValueError(f"{len(ids)} ids for {len(references)} items.")
    hyps = [canonical_text(t) for t in generated]
    refs = [canonical_text(t) for t in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    rows: list[dict[str, Any]] = []
    for item_id, hyp, ref in zip(ids, hyps, refs, strict=True):
        parsed_ref = parse_description(ref)
        if parsed_ref is None:
            raise ValueError(f"Reference of item '{item_id}' is not a describer text: {ref[:80]!r}.")
        parsed_gen = parse_description(hyp)
        rows.append(
            {
                "id": item_id,
                "bleu": sacrebleu.sentence_bleu(hyp, [ref]).score / 100.0,
                "rouge_l": scorer.score(ref, hyp)["rougeL"].fmeasure,
                "parsed": parsed_gen is not None,
                **fact_agreement(parsed_ref, parsed_gen),
                "generated": hyp,
                "reference": ref,
            }
        )

    corpus: dict[str, float] = {
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score / 100.0,
        "rouge_l": float(np.mean([r["rouge_l"] for r in rows])),
        "parse_rate": float(np.mean([r["parsed"] for r in rows])),
        "n_items": float(len(rows)),
    }
    corpus.update({name: float(np.mean([r[name] for r in rows])) for name in AGREEMENTS})
    logger.info(
        "Explainer text metrics on %d items: BLEU %.3f, ROUGE-L %.3f, location %.3f, size %.3f",
        len(rows),
        corpus["bleu"],
        corpus["rouge_l"],
        corpus["location_agreement"],
        corpus["size_agreement"],
    )
    return TextMetrics(corpus=corpus, per_item=rows)
