"""LMS: linear multistep (Adams-Bashforth with variable step) in sigma space, up to fourth order."""

from sdcore.schedulers.euler import Euler

ORDER = 4  # the reference's default, which its pipelines use


class LMS(Euler):
    name = "lms"
    unsupported = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    pinned = {"sigma_min": None, "sigma_max": None, "final_sigmas_type": "zero"}

    def _schedule(self, n: int) -> None:
        super()._schedule(n)
        self._sigma_list = self.sigmas.tolist()
        self._derivatives = []  # dx/dsigma of the last (up to) ORDER steps, oldest first

    def step(self, model_output, t, x, generator=None):
        i = self._current(t)
        sigma = self.sigmas[i]
        self._derivatives = self._derivatives[-(ORDER - 1):] + [(x - self._x0(model_output, x, sigma)) / sigma]
        order = min(i + 1, ORDER)
        coefficients = [lms_coefficient(self._sigma_list, i, order, j) for j in range(order)]
        self._index += 1
        return x + sum(c * d for c, d in zip(coefficients, reversed(self._derivatives)))


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Integral from sigmas[i] to sigmas[i + 1] of the Lagrange basis polynomial through
    sigmas[i], sigmas[i - 1], ..., sigmas[i - order + 1] that is 1 at sigmas[i - j] and 0 at the others.

    Integrated exactly (the reference uses numerical quadrature), in u = sigma - sigmas[i] so that the
    interval is [0, h] and nothing large cancels."""
    poly = [1.0]  # coefficients of u^0, u^1, ...
    for k in range(order):
        if k == j:
            continue
        root, scale = sigmas[i - k] - sigmas[i], sigmas[i - j] - sigmas[i - k]
        # poly *= (u - root) / scale
        poly = [(lower - root * same) / scale for lower, same in zip([0.0] + poly, poly + [0.0])]
    h = sigmas[i + 1] - sigmas[i]
    return sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly))
