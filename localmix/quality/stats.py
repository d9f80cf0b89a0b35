"""The statistics of `llama-perplexity --kl-divergence`, gathered chunk by chunk in numpy.

For every scored token: the model's and the reference's negative log-likelihood of the text's next
token, the KL divergence of the model's next-token distribution from the reference's, whether both
rank the same token first, and the change in the next token's probability (Δp). The definitions and
summaries are llama.cpp's (tools/perplexity/perplexity.cpp): sums in double precision, uncertainties
from sums of squares, percentiles interpolated between sorted values, and KL terms left out where
the reference's log-probability is -16 or less (its uint16 base-logits file cannot hold them).
Memory is bounded by a block of rows at a time, whatever the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

KLD_FLOOR = -16.0  # reference log-probabilities at or below this add nothing to the KL sum
_BLOCK_ELEMENTS = 1 << 21  # rows per numpy step: ~8 MiB float32 temporaries at any vocabulary


@dataclass(frozen=True)
class Scores:
    """What llama-perplexity --kl-divergence prints, for `n_tokens` scored tokens. Each *_unc is
    its ± (one standard error); probabilities and Δp are fractions (0.5 = 50%)."""

    n_tokens: int
    ppl: float
    ppl_unc: float
    ppl_ref: float
    ppl_ref_unc: float
    ppl_ratio: float  # PPL(model) / PPL(reference)
    ppl_ratio_unc: float
    ln_ppl_ratio: float
    ln_ppl_ratio_unc: float
    ppl_correlation: float  # Cor(ln PPL(model), ln PPL(reference))
    kld_mean: float
    kld_unc: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    kld_min: float
    same_top: float
    same_top_unc: float
    dp_mean: float
    dp_mean_unc: float
    dp_rms: float
    dp_rms_unc: float
    dp_max: float  # the largest |Δp|


def _mean_and_uncertainty(total: float, squares: float, count: int) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and its standard error (0 below 11 values)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = squares / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


def percentile(values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between sorted `values` at `fraction` of the way (llama.cpp's rule,
    which is numpy's default 'linear' method)."""
    n = len(values)
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    at = fraction * (n - 1)
    low = int(at)
    weight = at - low
    return float((1 - weight) * values[low] + weight * values[min(low + 1, n - 1)])


def _median(values: np.ndarray) -> float:
    n = len(values)
    if n % 2:
        return float(values[n // 2])
    return float(0.5 * (values[n // 2] + values[n // 2 - 1]))


@dataclass
class Tally:
    """Running sums over scored tokens; add() one chunk's rows, scores() at any point."""

    count: int = 0
    n_same_top: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_ref: float = 0.0
    sum_nll_ref2: float = 0.0
    sum_nll_nll_ref: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_dp: float = 0.0
    sum_dp2: float = 0.0
    sum_dp4: float = 0.0
    max_dp: float = 0.0
    # per-token values for the median and percentiles: 8 bytes a token, not a vocabulary
    klds: list[np.ndarray] = field(default_factory=list, repr=False)
    dps: list[np.ndarray] = field(default_factory=list, repr=False)

    def add(self, reference: np.ndarray, model: np.ndarray, targets: np.ndarray) -> None:
        """Score rows of logits: reference[i] and model[i] (float32, n_vocab wide) predict the
        token targets[i]."""
        import numpy as np

        if reference.shape != model.shape or len(targets) != len(model):
            raise ValueError("reference, model and targets must have the same number of rows")
        step = max(1, _BLOCK_ELEMENTS // max(1, model.shape[1]))
        for start in range(0, len(model), step):
            rows = slice(start, start + step)
            self._add_block(reference[rows], model[rows], np.asarray(targets[rows]))

    def _add_block(self, reference: np.ndarray, model: np.ndarray, targets: np.ndarray) -> None:
        import numpy as np

        index = np.arange(len(targets))
        log_ref, p_ref = _log_softmax(reference, probabilities=True)
        log_model, _ = _log_softmax(model)
        nll = -log_model[index, targets].astype(np.float64)
        nll_ref = -log_ref[index, targets].astype(np.float64)
        # KL(reference || model) per row: sum p_ref * (log p_ref - log p_model), double sums
        skipped = log_ref <= KLD_FLOOR
        log_model -= log_ref
        log_model *= p_ref
        log_model[skipped] = 0.0
        kld = -log_model.sum(axis=1, dtype=np.float64)
        same = np.argmax(model, axis=1) == np.argmax(reference, axis=1)
        dp = np.exp(-nll) - np.exp(-nll_ref)

        self.count += len(targets)
        self.n_same_top += int(same.sum())
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        self.sum_nll_ref += float(nll_ref.sum())
        self.sum_nll_ref2 += float((nll_ref * nll_ref).sum())
        self.sum_nll_nll_ref += float((nll * nll_ref).sum())
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.sum_dp += float(dp.sum())
        self.sum_dp2 += float((dp * dp).sum())
        self.sum_dp4 += float((dp**4).sum())
        self.max_dp = max(self.max_dp, float(np.abs(dp).max(initial=0.0)))
        self.klds.append(kld.astype(np.float32))
        self.dps.append(dp.astype(np.float32))

    def scores(self) -> Scores:
        """The summary llama-perplexity prints after its last chunk."""
        import numpy as np

        n = self.count
        if n == 0:
            raise ValueError("no tokens scored")
        ln_ppl, ln_ppl_unc = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        ln_ref, ln_ref_unc = _mean_and_uncertainty(self.sum_nll_ref, self.sum_nll_ref2, n)
        cov = self._log_ppl_covariance()
        ln_ratio = ln_ppl - ln_ref
        ln_ratio_unc = math.sqrt(max(0.0, ln_ppl_unc**2 + ln_ref_unc**2 - 2.0 * cov))
        both = ln_ppl_unc * ln_ref_unc
        kld_mean, kld_unc = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        dp_mean, dp_unc = _mean_and_uncertainty(self.sum_dp, self.sum_dp2, n)
        mse, mse_unc = _mean_and_uncertainty(self.sum_dp2, self.sum_dp4, n)
        rms = math.sqrt(mse)
        same = self.n_same_top / n
        klds = np.sort(np.concatenate(self.klds))
        ppl, ref = math.exp(ln_ppl), math.exp(ln_ref)
        ratio = math.exp(ln_ratio)
        return Scores(
            n_tokens=n,
            ppl=ppl,
            ppl_unc=ppl * ln_ppl_unc,
            ppl_ref=ref,
            ppl_ref_unc=ref * ln_ref_unc,
            ppl_ratio=ratio,
            ppl_ratio_unc=ratio * ln_ratio_unc,
            ln_ppl_ratio=ln_ratio,
            ln_ppl_ratio_unc=ln_ratio_unc,
            ppl_correlation=cov / both if both > 0 else 0.0,
            kld_mean=kld_mean,
            kld_unc=kld_unc,
            kld_median=_median(klds),
            kld_p90=percentile(klds, 0.90),
            kld_p95=percentile(klds, 0.95),
            kld_p99=percentile(klds, 0.99),
            kld_p999=percentile(klds, 0.999),
            kld_max=float(klds[-1]),
            kld_min=float(klds[0]),
            same_top=same,
            same_top_unc=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            dp_mean=dp_mean,
            dp_mean_unc=dp_unc,
            dp_rms=rms,
            dp_rms_unc=0.5 / rms * mse_unc if rms > 0 else 0.0,
            dp_max=self.max_dp,
        )

    def _log_ppl_covariance(self) -> float:
        """llama.cpp's covariance of the two mean log-likelihoods (0 below 10 tokens)."""
        n = self.count
        if n < 10:
            return 0.0
        cov = self.sum_nll_nll_ref / n - (self.sum_nll / n) * (self.sum_nll_ref / n)
        return cov / (n - 1)


def _log_softmax(
    logits: np.ndarray, *, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Row-wise log-softmax in float32, the normaliser summed in float64 (as llama.cpp sums
    it); with probabilities, the softmax too, from the same exponentials."""
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    exps = np.exp(shifted)
    total = exps.sum(axis=1, keepdims=True, dtype=np.float64)
    shifted -= np.log(total).astype(np.float32)
    if not probabilities:
        return shifted, None
    exps /= total.astype(np.float32)
    return shifted, exps
