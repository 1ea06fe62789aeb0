"""Least-squares line y = a + b*x over a stream of samples, in O(1) memory (running sums)."""
from __future__ import annotations


class OnlineLinearFit:
    def __init__(self):
        self.n = 0
        self._sx = self._sy = self._sxx = self._sxy = 0.0

    def add(self, x: float, y: float) -> None:
        self.n += 1
        self._sx += x
        self._sy += y
        self._sxx += x * x
        self._sxy += x * y

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None before two distinct x values were seen; a flat fit when x never varied."""
        if self.n == 0:
            return None
        mean_x, mean_y = self._sx / self.n, self._sy / self.n
        var_x = self._sxx / self.n - mean_x * mean_x
        if var_x <= 1e-12:
            return (mean_y, 0.0)
        b = (self._sxy / self.n - mean_x * mean_y) / var_x
        return (mean_y - b * mean_x, b)
