"mdxlib.metrics from the outside: agreement with scikit-learn/SciPy, known values, input kinds and bad input."
import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from mdxlib.metrics import (CI, LN2, accuracy, as_array, auroc, bits_per_token, bits_to_nats, bootstrap_ci,
                            format_mean_std, mean_std, nats_to_bits, perplexity, precision_recall_f1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    return y, y + 1.5 * rng.normal(size=300)


@pytest.mark.parametrize("kind", [list, np.asarray, torch.tensor])
def test_auroc_matches_sklearn_and_mann_whitney(data, kind):
    y, s = data
    value = auroc(kind(y.tolist()), kind(s.tolist()))
    assert math.isclose(value, skm.roc_auc_score(y, s), rel_tol=1e-6)
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert math.isclose(value, u / ((y == 1).sum() * (y == 0).sum()), rel_tol=1e-6)


def test_auroc_known_values(data):
    y, s = data
    assert auroc(y, y) == 1.0 and auroc(y, -y.astype(float)) == 0.0 and auroc(y, np.ones_like(s)) == 0.5
    assert auroc(y.astype(bool), s) == auroc(y, s)
    s16 = torch.tensor(s, dtype=torch.bfloat16)
    assert auroc(torch.tensor(y), s16) == auroc(y, s16.float())
    assert auroc([0, 1, 0, 1], [0.1, 0.4, 0.5, 0.8]) == 0.75  # one of four pairs mis-ordered


@pytest.mark.parametrize("labels, scores, exc, needle", [
    ([1, 1, 1], [0.1, 0.2, 0.3], ValueError, "one class"),
    ([0, 0], [0.1, 0.2], ValueError, "one class"),
    ([0, 1, 1], [0.1, float("nan"), 0.3], ValueError, "1 NaN"),
    ([0, 1, 1], [0.1, float("inf"), 0.3], ValueError, "1 infinite"),
    ([0, 1, 2], [0.1, 0.2, 0.3], ValueError, "0/1"),
    ([0, 1], [0.1, 0.2, 0.3], ValueError, "lengths do not match"),
    ([], [], ValueError, "empty"),
    ([[0, 1]], [[0.1, 0.2]], ValueError, "1 dimension"),
    ("01", [0.1, 0.2], TypeError, "labels"),
    ([0, 1], ["a", "b"], TypeError, "numbers"),
])
def test_auroc_refuses_undefined_input(labels, scores, exc, needle):
    with pytest.raises(exc, match=needle):
        auroc(labels, scores)


def test_as_array_accepts_tensors_on_any_dtype():
    assert as_array(torch.ones(3, dtype=torch.float16)).dtype == np.float32
    assert as_array(torch.ones(2, 3, requires_grad=True), ndim=2).shape == (2, 3)
    assert as_array(5, ndim=0).shape == ()
    with pytest.raises(TypeError, match="x must"):
        as_array({1: 2})


def test_precision_recall_f1_and_accuracy():
    y, p = [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]  # TP 2, FP 1, FN 1, TN 2
    got = precision_recall_f1(y, p)
    assert got == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3))
    assert precision_recall_f1(torch.tensor(y), np.array(p)) == got
    assert accuracy(y, p) == pytest.approx(4 / 6) and accuracy(torch.tensor([3, 2]), [3, 2]) == 1.0
    assert precision_recall_f1([1, 1, 0], [0, 0, 0]) == dict(precision=0.0, recall=0.0, f1=0.0)
    multi_y, multi_p = [0, 1, 2, 2, 1], [0, 2, 2, 2, 1]
    for average in ("macro", "micro", "weighted"):
        prec, rec, f1, _ = skm.precision_recall_fscore_support(multi_y, multi_p, average=average, zero_division=0)
        expected = pytest.approx(dict(precision=prec, recall=rec, f1=f1))
        assert precision_recall_f1(multi_y, multi_p, average=average) == expected
    with pytest.raises(ValueError, match="average"):
        precision_recall_f1(y, p, average="samples")
    with pytest.raises(ValueError, match="0/1"):
        precision_recall_f1([0, 2], [0, 1])
    with pytest.raises(ValueError, match="lengths do not match"):
        accuracy([0, 1, 1], [0, 1])


def test_bootstrap_ci_contains_estimate_and_is_seeded(data):
    y, s = data
    ci = bootstrap_ci(auroc, y, s, n_boot=100)
    assert isinstance(ci, CI) and ci.low < ci.estimate < ci.high and ci.estimate == auroc(y, s)
    assert bootstrap_ci(auroc, y, s, n_boot=100) == ci and bootstrap_ci(auroc, y, s, n_boot=100, seed=1) != ci
    narrow = bootstrap_ci(auroc, y, s, n_boot=100, alpha=0.5)
    assert ci.low < narrow.low < narrow.high < ci.high
    assert bootstrap_ci(auroc, torch.tensor(y), torch.tensor(s), n_boot=100) == ci


def test_bootstrap_ci_agrees_with_the_normal_interval_of_a_mean():
    x = np.random.default_rng(1).normal(10.0, 2.0, 2000)
    ci = bootstrap_ci(np.mean, x, n_boot=2000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert math.isclose(ci.high - ci.low, 2 * half, rel_tol=0.1) and math.isclose(ci.estimate, x.mean())


def test_bootstrap_ci_resamples_pairs_along_the_first_axis():
    probs = np.random.default_rng(2).dirichlet(np.ones(3), size=200)  # (n, 3) class probabilities
    labels = probs.argmax(1)
    ci = bootstrap_ci(lambda p, y: accuracy(y, p.argmax(1)), probs, labels, n_boot=50)
    assert ci == (1.0, 1.0, 1.0)  # labels travel with their rows: every resample is right


def test_bootstrap_ci_bad_input(data):
    y, s = data
    with pytest.raises(ValueError, match="undefined on"):
        bootstrap_ci(auroc, [0, 1, 1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], n_boot=200)
    with pytest.raises(ValueError, match="lengths do not match"):
        bootstrap_ci(auroc, y, s[:-1])
    with pytest.raises(ValueError, match="at least one array"):
        bootstrap_ci(auroc)
    with pytest.raises(TypeError, match="metric_fn"):
        bootstrap_ci("auroc", y, s)
    for kwargs, needle in [(dict(n_boot=1), "n_boot"), (dict(n_boot=2.5), "n_boot"), (dict(alpha=0.0), "alpha"),
                           (dict(alpha=1.5), "alpha"), (dict(method="normal"), "method")]:
        with pytest.raises(ValueError, match=needle):
            bootstrap_ci(auroc, y, s, **kwargs)
    with pytest.raises(ValueError, match="full data"):
        bootstrap_ci(lambda a: math.nan, s)


def test_mean_std_and_format():
    values = [78.1, 79.5, 78.2]
    m, sd = mean_std(values)
    assert m == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
    assert mean_std(torch.tensor(values, dtype=torch.float64), ddof=0)[1] == pytest.approx(np.std(values))
    assert format_mean_std(values) == "78.6 ± 0.8"
    assert format_mean_std([0.786, 0.774], scale=100, digits=2) == "78.00 ± 0.85"
    assert format_mean_std([3.14159], digits=3) == "3.142"
    with pytest.raises(ValueError, match="more than 1"):
        mean_std([1.0])
    with pytest.raises(ValueError, match="finite"):
        mean_std([1.0, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        format_mean_std([float("nan")])
    with pytest.raises(ValueError, match="ddof"):
        mean_std([1.0, 2.0], ddof=-1)


def test_nats_bits_and_perplexity():
    assert nats_to_bits(LN2) == 1.0 and bits_to_nats(1.0) == LN2
    assert nats_to_bits(np.array([LN2, 2 * LN2])).tolist() == pytest.approx([1.0, 2.0])
    out = nats_to_bits(torch.tensor([LN2]))
    assert torch.is_tensor(out) and out.item() == pytest.approx(1.0)
    assert nats_to_bits([LN2])[0] == pytest.approx(1.0)
    n = 1234
    assert bits_per_token(n * math.log(27), n) == pytest.approx(math.log2(27))  # uniform over 27 characters
    assert bits_per_token(torch.tensor(n * math.log(2.0)), np.int64(n)) == pytest.approx(1.0)
    assert perplexity(math.log(27)) == pytest.approx(27) and perplexity(bits_to_nats(3.0)) == pytest.approx(8)
    assert perplexity(torch.tensor(0.0)) == 1.0
    for call, exc, needle in [(lambda: bits_per_token(1.0, 0), ValueError, "n_tokens"),
                              (lambda: bits_per_token(1.0, 2.5), ValueError, "n_tokens"),
                              (lambda: bits_per_token(float("inf"), 3), ValueError, "total_nats"),
                              (lambda: bits_per_token("3", 3), TypeError, "total_nats"),
                              (lambda: perplexity(float("nan")), ValueError, "mean_nll"),
                              (lambda: perplexity(1e4), ValueError, "overflows"),
                              (lambda: nats_to_bits("1.0"), TypeError, "nats"),
                              (lambda: bits_to_nats(None), TypeError, "bits")]:
        with pytest.raises(exc, match=needle):
            call()
