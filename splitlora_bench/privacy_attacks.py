"""What an honest-but-curious split server can recover from what it receives: the attacks of `splitlora-bench
privacy` and their metrics. The attacker knows the frozen base weights (not the clients' adapters) and public text
disjoint from the clients' data; it sees the cut activations after the negotiated codec (and, in standard mode,
the labels).

- label leakage: the labels a standard-mode frame carries are the text's target tokens;
- learning-based inversion (as in BiSR's learning-based part, arXiv 2409.00960): a per-token MLP decoder trained on
  the base's cut activations of public text (with the same defense applied, Kerckhoffs) maps each activation to a
  token of the public vocabulary;
- optimization-based inversion (as in BiSR's forward optimization / UnSplit): soft input embeddings optimized so
  the base bottom's output matches the captured activations (cosine + MSE), snapped to the nearest token embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.data import IGNORE_INDEX
from common.defenses import ActivationDefense
from common.split.parts import SplitPart


@dataclass
class Captured:
    """What the server received for some sequences, with the ground truth to score against."""

    hidden: list[torch.Tensor]          # per sequence (T, d): the decoded cut activations, padding removed
    input_ids: list[torch.Tensor]       # per sequence (T,): the truth
    positions: list[torch.Tensor]       # per sequence (T,)
    labels: list[torch.Tensor | None]   # per sequence (T,): what the wire carried (None: no labels field)


# -- metrics -------------------------------------------------------------------------------------------------
def lcs(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(guess: list[int], truth: list[int]) -> float:
    """ROUGE-L F1 over token ids (Lin 2004, beta = 1)."""
    if not guess or not truth:
        return 0.0
    n = lcs(guess, truth)
    if n == 0:
        return 0.0
    p, r = n / len(guess), n / len(truth)
    return 2 * p * r / (p + r)


def score(guesses: list[torch.Tensor], truths: list[torch.Tensor]) -> dict[str, float]:
    """Token recovery accuracy (position by position), ROUGE-L F1 and exact-sentence rate, over sequences."""
    right = total = exact = 0
    rouge = 0.0
    for g, t in zip(guesses, truths):
        right += int((g == t).sum())
        total += int(t.numel())
        exact += int(torch.equal(g, t))
        rouge += rouge_l_f1(g.tolist(), t.tolist())
    n = max(len(truths), 1)
    return {"token_acc": right / max(total, 1), "rouge_l": rouge / n, "exact": exact / n}


def label_leakage(cap: Captured) -> dict[str, float]:
    """The target tokens the labels field gives away, scored as recovered text (0 when no labels were sent)."""
    guesses, truths = [], []
    for labels, ids in zip(cap.labels, cap.input_ids):
        target = ids[1:]  # the labels of position t+1 are the text; the server shifts them
        got = labels[1:] if labels is not None else torch.full_like(target, -1)
        keep = got != IGNORE_INDEX if labels is not None else torch.ones_like(target, dtype=torch.bool)
        guesses.append(got[keep])
        truths.append(target[keep])
    return score(guesses, truths)


# -- learning-based inversion --------------------------------------------------------------------------------
class Decoder(torch.nn.Module):
    """Per-token MLP from a cut activation to a token of the attacker's public vocabulary."""

    def __init__(self, width: int, vocab: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vocab", vocab)
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 2 * width),
                                       torch.nn.GELU(), torch.nn.Linear(2 * width, len(vocab)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab[self.forward(hidden).argmax(-1)]


def public_activations(base: SplitPart, public: list[dict[str, torch.Tensor]], defense: ActivationDefense,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, token ids) of every real token of the public batches through the base bottom, defended."""
    xs, ys = [], []
    torch.manual_seed(seed)
    with torch.no_grad():
        for b in public:
            h = defense.apply(base(b["input_ids"], b["attention_mask"], b["position_ids"]), b["attention_mask"])
            keep = b["attention_mask"].bool()
            xs.append(h[keep])
            ys.append(b["input_ids"][keep])
    return torch.cat(xs), torch.cat(ys)


def train_decoder(xs: torch.Tensor, ys: torch.Tensor, steps: int, seed: int, batch: int = 512) -> Decoder:
    """Fit the decoder on (activation, token) pairs of public text."""
    vocab, targets = torch.unique(ys, return_inverse=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = Decoder(xs.shape[-1], vocab)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (min(batch, len(xs)),), generator=gen)
        loss = F.cross_entropy(dec(xs[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval()


def learning_inversion(dec: Decoder, cap: Captured) -> dict[str, float]:
    """Decode every captured activation to a token."""
    return score([dec.predict(h) for h in cap.hidden], cap.input_ids)


# -- optimization-based inversion ----------------------------------------------------------------------------
def optimization_inversion(base: SplitPart, cap: Captured, steps: int, lr: float = 0.05) -> dict[str, float]:
    """Soft input embeddings (all sequences at once, right-padded) whose base-bottom output matches the captured
    activations on the real tokens, snapped to the nearest token embeddings (cosine)."""
    model = base.base
    wte = model.get_input_embeddings().weight.detach()
    unit = F.normalize(wte, dim=-1)
    lengths = [len(t) for t in cap.input_ids]
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    pos = torch.stack([F.pad(p, (0, width - len(p))) for p in cap.positions])
    target = torch.stack([F.pad(h, (0, 0, 0, width - len(h))) for h in cap.hidden])
    keep = mask.bool()
    scale = target[keep].var()
    soft = wte.mean(0).expand(len(lengths), width, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=lr)
    for _ in range(steps):
        out = base.run_blocks(soft + model.transformer.wpe(pos), mask, pos)
        loss = (1 - F.cosine_similarity(out[keep], target[keep], dim=-1)).mean() + \
            F.mse_loss(out[keep], target[keep]) / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    snapped = (F.normalize(soft.detach(), dim=-1) @ unit.T).argmax(-1)
    return score([snapped[i, :n] for i, n in enumerate(lengths)], cap.input_ids)
