"""A cost model fitted online: milliseconds as a non-negative linear function of a few features (plain Python).

The router prices each stage with one per replica (services/router/costs.py); the llm prices its own steps with
one (services/llm/step_budget.py).
"""

from __future__ import annotations


class OnlineLinear:
    """ms ≈ w · features with w ≥ 0, fitted online by exponentially weighted non-negative least squares.

    The fit keeps decayed sufficient statistics (Σ x xᵀ, Σ x y) with a half-life counted in observations,
    so it follows a replica whose speed changes (load, thermal, a new GPU), plus a faint prior towards the
    seed: the first observations move the seed as little as fits them, and directions nothing measures (an
    idle llm steps at batch 1 for minutes) keep the seed instead of drifting. Each update solves the small
    problem exactly under w ≥ 0 (every feature costs time; at most 3 features, so by trying each set of free
    weights), which cannot wind up the way recursive least squares with clipped weights does: a prediction
    stays within the range the observations span. An observation far from the prediction (a stalled
    replica, a busy machine) is clipped to a few times the prediction first: a slower replica shows over
    several updates.
    """

    def __init__(self, seed: list[float], *, half_life: float = 16.0, prior_weight: float = 1e-3,
                 max_error_ratio: float = 2.0, min_error_ms: float = 5.0):
        self.seed = [max(0.0, w) for w in seed]
        self.weights = list(self.seed)
        n = len(seed)
        self.decay = 0.5 ** (1.0 / half_life)
        self.prior_weight = prior_weight
        self.max_error_ratio = max_error_ratio
        self.min_error_ms = min_error_ms
        self._xx = [[0.0] * n for _ in range(n)]
        self._xy = [0.0] * n
        self._scale = [1.0] * n  # largest |x_i| seen: the prior is prior_weight times an observation that size
        self.num_updates = 0

    def predict(self, features: list[float]) -> float:
        """Predicted milliseconds, never negative."""
        return max(0.0, sum(w * x for w, x in zip(self.weights, features)))

    def update(self, features: list[float], observed_ms: float) -> None:
        """Adds one observation and refits."""
        predicted = self.predict(features)
        limit = max(self.min_error_ms, self.max_error_ratio * predicted)
        y = predicted + min(limit, max(-limit, observed_ms - predicted))
        n = len(self.weights)
        for i in range(n):
            self._scale[i] = max(self._scale[i], abs(features[i]))
            self._xy[i] = self.decay * self._xy[i] + features[i] * y
            for j in range(n):
                self._xx[i][j] = self.decay * self._xx[i][j] + features[i] * features[j]
        prior = [self.prior_weight * s * s for s in self._scale]
        a = [[self._xx[i][j] + (prior[i] if i == j else 0.0) for j in range(n)] for i in range(n)]
        b = [self._xy[i] + prior[i] * self.seed[i] for i in range(n)]
        self.weights = _nonnegative_quadratic_min(a, b)
        self.num_updates += 1


def _nonnegative_quadratic_min(a: list[list[float]], b: list[float]) -> list[float]:
    """argmin over w ≥ 0 of wᵀAw − 2bᵀw for a small positive definite A: the best of the unconstrained
    minima on every subset of free weights that come out non-negative (the zero vector always does)."""
    n = len(b)
    best, best_value = [0.0] * n, 0.0
    for mask in range(1, 1 << n):
        free = [i for i in range(n) if mask >> i & 1]
        solution = _solve([[a[i][j] for j in free] for i in free], [b[i] for i in free])
        if solution is None or min(solution) < 0.0:
            continue
        w = [0.0] * n
        for i, v in zip(free, solution):
            w[i] = v
        value = sum(w[i] * a[i][j] * w[j] for i in range(n) for j in range(n)) - 2 * sum(x * y for x, y in zip(w, b))
        if value < best_value:
            best, best_value = w, value
    return best


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """A x = b by Gaussian elimination with partial pivoting (None when singular)."""
    n = len(b)
    m = [row[:] + [v] for row, v in zip(a, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12 * max(1.0, abs(m[col][col])):
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
