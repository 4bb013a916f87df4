"""The E2E NLG table's metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr) from maintained packages, with the references
of each output grouped by its context (meaning representation), as the official e2e-metrics scripts do.

Which implementation gives each number (the `eval` extra installs them; all work offline, none needs Java):
BLEU: sacrebleu `corpus_bleu` (13a tokenization, lowercased); NIST: nltk `corpus_nist` (n=5); METEOR: nltk
`meteor_score` with exact and Porter-stem matches only (WordNet synonyms need nltk data that cannot be downloaded
here; the official scorer is Java METEOR 1.5, so expect lower values); ROUGE-L and CIDEr (CIDEr-D): pycocoevalcap,
the code e2e-metrics itself calls. BLEU is reported as a fraction in [0, 1] like e2e-metrics.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Sequence

IMPLEMENTATIONS = {
    "BLEU": "sacrebleu.corpus_bleu (13a, lowercase)",
    "NIST": "nltk.translate.nist_score.corpus_nist (n=5)",
    "METEOR": "nltk.translate.meteor_score (exact + stem matches, no WordNet synonyms)",
    "ROUGE_L": "pycocoevalcap.rouge.Rouge",
    "CIDEr": "pycocoevalcap.cider.Cider",
}
_TOKEN = re.compile(r"\w+|[^\w\s]")
MISSING_HINT = "the E2E metrics need the `eval` extra: pip install 'splitlora[eval]' (sacrebleu, nltk, pycocoevalcap)"


class _NoWordNet:
    """Stands in for nltk's WordNet (its data cannot be downloaded offline): no synonyms."""

    @staticmethod
    def synsets(*_args, **_kwargs) -> list:
        return []


def group_references(contexts: Sequence[str], references: Sequence[str]) -> "OrderedDict[str, list[str]]":
    """Every reference of each distinct context, in first-seen order."""
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for context, reference in zip(contexts, references):
        grouped.setdefault(context, []).append(reference)
    return grouped


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def e2e_scores(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus metrics of one output per context against all of that context's references."""
    try:
        import sacrebleu
        from nltk.translate.meteor_score import meteor_score
        from nltk.translate.nist_score import corpus_nist
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise RuntimeError(f"{MISSING_HINT} ({err})") from err
    if not outputs or len(outputs) != len(references):
        raise ValueError("need one output per context, and at least one")
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(list(outputs), streams, lowercase=True).score / 100.0
    hyp_tokens = [_tokens(o) for o in outputs]
    ref_tokens = [[_tokens(r) for r in refs] for refs in references]
    nist = corpus_nist(ref_tokens, hyp_tokens, n=5)
    meteor = sum(meteor_score(refs, hyp, wordnet=_NoWordNet()) for refs, hyp in zip(ref_tokens, hyp_tokens))
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(ref_tokens)}
    res = {i: [" ".join(hyp)] for i, hyp in enumerate(hyp_tokens)}
    rouge = Rouge().compute_score(gts, res)[0]
    cider = Cider().compute_score(gts, res)[0]
    return {"BLEU": bleu, "NIST": float(nist), "METEOR": meteor / len(outputs), "ROUGE_L": float(rouge),
            "CIDEr": float(cider)}
