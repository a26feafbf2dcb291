"""Self-calibration metrics: does the model's confidence match its accuracy?

Computed from the per-choice log-likelihoods that lm-eval logs for a
multiple-choice task.  The model's answer distribution is the softmax of the
choices' log-likelihoods (the probability mass it puts on each option,
renormalised over the options); its confidence is the largest probability and
its answer the argmax, exactly the prediction behind lm-eval's ``acc``.

* ECE (expected calibration error, Guo et al. 2017): confidences in
  ``bins`` equal-width bins; the size-weighted mean of |accuracy − mean
  confidence| per bin.  0 is perfectly calibrated.
* Brier score (multi-class): mean over items of Σ_k (p_k − y_k)², 0 best, 2 worst.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class CalibrationScores:
    ece: float
    ece_stderr: float
    brier: float
    brier_stderr: float
    acc: float
    acc_stderr: float
    confidence: float
    samples: int

    def as_metrics(self) -> dict[str, float]:
        return dict(self.__dict__)


def choice_probabilities(loglikelihoods: list[float]) -> torch.Tensor:
    return torch.softmax(torch.tensor(loglikelihoods, dtype=torch.float64), dim=0)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> float:
    """ECE with ``bins`` equal-width confidence bins over [0, 1] (a confidence of exactly 1 goes in the last)."""
    idx = torch.clamp((confidence * bins).long(), max=bins - 1)
    ece = 0.0
    n = len(confidence)
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.sum().item() / n * abs(correct[mask].double().mean().item() - confidence[mask].mean().item())
    return ece


def _item_tensors(
    per_item_loglikelihoods: list[list[float]], gold: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per item: confidence (the largest choice probability), the chosen choice (argmax), whether it
    is the gold one, and the multi-class Brier score."""
    probs = [choice_probabilities(ll) for ll in per_item_loglikelihoods]
    confidence = torch.stack([p.max() for p in probs])
    choice = torch.tensor([int(p.argmax()) for p in probs])
    correct = torch.tensor([int(c) == g for c, g in zip(choice, gold)])
    brier_items = torch.stack(
        [((p - torch.nn.functional.one_hot(torch.tensor(g), len(p)).double()) ** 2).sum() for p, g in zip(probs, gold)]
    )
    return confidence, choice, correct, brier_items


def calibration_items(per_item_loglikelihoods: list[list[float]], gold: list[int]) -> dict[str, list]:
    """The per-item values behind :func:`calibration_scores`: ``correct`` (0/1; its mean is ``acc``),
    ``confidence`` (its mean is ``confidence``), ``brier`` (its mean is ``brier``), ``choice`` (the
    argmax choice's index) and ``gold``.  ECE has no per-item value: it bins the items."""
    confidence, choice, correct, brier_items = _item_tensors(per_item_loglikelihoods, gold)
    return {
        "correct": [int(c) for c in correct.tolist()],
        "confidence": confidence.tolist(),
        "brier": brier_items.tolist(),
        "choice": choice.tolist(),
        "gold": [int(g) for g in gold],
    }


def calibration_scores(
    per_item_loglikelihoods: list[list[float]], gold: list[int], bins: int = 10, bootstrap: int = 1000, seed: int = 0
) -> CalibrationScores:
    """ECE, Brier score and accuracy (each with a standard error) of a set of multiple-choice items.

    The ECE's standard error is bootstrapped (``bootstrap`` resamples of the items,
    seeded); Brier's and accuracy's are the usual std / sqrt(n).
    """
    if not per_item_loglikelihoods:
        raise ValueError("no items to compute calibration on")
    confidence, _, correct, brier_items = _item_tensors(per_item_loglikelihoods, gold)
    n = len(confidence)
    ece = expected_calibration_error(confidence, correct, bins)
    gen = torch.Generator().manual_seed(seed)
    boot = []
    for _ in range(bootstrap if n > 1 else 0):
        sample = torch.randint(0, n, (n,), generator=gen)
        boot.append(expected_calibration_error(confidence[sample], correct[sample], bins))
    ece_stderr = float(torch.tensor(boot).std()) if boot else float("nan")

    def stderr(x: torch.Tensor) -> float:
        return float(x.double().std() / math.sqrt(n)) if n > 1 else float("nan")

    return CalibrationScores(
        ece=ece,
        ece_stderr=ece_stderr,
        brier=float(brier_items.mean()),
        brier_stderr=stderr(brier_items),
        acc=float(correct.double().mean()),
        acc_stderr=stderr(correct),
        confidence=float(confidence.mean()),
        samples=n,
    )
