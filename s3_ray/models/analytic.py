"""Analytic data distributions with exact denoisers, for testing solvers against exact answers.

``GaussianData``: x0 ~ N(mu, U diag(s^2) U^T); the probability-flow ODE is linear and solved in closed
form along the axes U: x_t = alpha_t mu + U sqrt(v_t / v_s) U^T (x_s - alpha_s mu), v = alpha^2 s^2 + sigma^2.
``GaussianMixture``: isotropic components; exact posterior-mean denoiser; reference solution by a
tight-tolerance adaptive ODE solve (scipy DOP853) of d(x/alpha)/dlambda = -e^-lambda eps.
Tensors of any shape [batch, ...] are flattened to [batch, d] internally.
"""

from __future__ import annotations

import numpy as np
import torch

from s3_ray.usf.noise import NoiseSchedule


class GaussianData:
    """x0 = mean + U z, z ~ N(0, diag(var)); U = ``basis`` (an orthogonal [d, d] matrix, default the
    identity) rotates the axes, so the covariance may be full."""

    def __init__(self, noise: NoiseSchedule, mean, var, basis=None):
        self.noise = noise
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.var = torch.as_tensor(var, dtype=torch.float64)
        self.basis = None if basis is None else torch.as_tensor(basis, dtype=torch.float64)

    def _to_axes(self, xf):  # coordinates along the principal axes
        return xf if self.basis is None else xf @ self.basis

    def _from_axes(self, yf):
        return yf if self.basis is None else yf @ self.basis.T

    def denoise(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """E[x0 | x_t = x]."""
        a, s = float(self.noise.alpha(t)), float(self.noise.sigma(t))
        shape = x.shape
        xf = x.reshape(shape[0], -1).to(torch.float64)
        mu, v = self.mean.expand_as(xf[0]), self.var.expand_as(xf[0])
        x0 = mu + self._from_axes(a * v / (a * a * v + s * s) * self._to_axes(xf - a * mu))
        return x0.reshape(shape).to(x.dtype)

    def net(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Network-style call (time label = t) returning x0, for ModelAdapter(output='x0')."""
        return self.denoise(x, float(labels[0]))

    def solve(self, x_s: torch.Tensor, t_s: float, t: float) -> torch.Tensor:
        """Exact ODE solution from (x_s, t_s) to time t."""
        shape = x_s.shape
        xf = x_s.reshape(shape[0], -1).to(torch.float64)
        mu, var = self.mean.expand_as(xf[0]), self.var.expand_as(xf[0])
        a_s, s_s = float(self.noise.alpha(t_s)), float(self.noise.sigma(t_s))
        a_t, s_t = float(self.noise.alpha(t)), float(self.noise.sigma(t))
        ratio = torch.sqrt((a_t**2 * var + s_t**2) / (a_s**2 * var + s_s**2))
        return (a_t * mu + self._from_axes(ratio * self._to_axes(xf - a_s * mu))).reshape(shape)

    def marginal(self, n: int, t: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of x_t (the forward process's marginal at t)."""
        a, s = float(self.noise.alpha(t)), float(self.noise.sigma(t))
        d = self.mean.numel() if self.mean.ndim else self.var.numel()
        z = torch.randn(n, d, generator=generator, dtype=torch.float64)
        return a * self.mean + self._from_axes(z * torch.sqrt(a * a * self.var + s * s))


class GaussianMixture:
    def __init__(self, noise: NoiseSchedule, weights, means, stds):
        self.noise = noise
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, d]
        self.stds = torch.as_tensor(stds, dtype=torch.float64)  # [K]

    def denoise(self, x: torch.Tensor, t: float) -> torch.Tensor:
        a, s = float(self.noise.alpha(t)), float(self.noise.sigma(t))
        shape = x.shape
        xf = x.reshape(shape[0], -1).to(torch.float64)
        d = xf.shape[1]
        v = a * a * self.stds**2 + s * s  # [K] marginal variance per component
        diff = xf[:, None, :] - a * self.means[None]  # [B, K, d]
        logp = torch.log(self.weights) - 0.5 * (diff**2).sum(-1) / v - 0.5 * d * torch.log(v)
        w = torch.softmax(logp, dim=1)  # [B, K]
        post = self.means[None] + (a * self.stds**2 / v)[None, :, None] * diff
        x0 = (w[..., None] * post).sum(1)
        return x0.reshape(shape).to(x.dtype)

    def net(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, float(labels[0]))

    def eps(self, x: torch.Tensor, t: float) -> torch.Tensor:
        a, s = float(self.noise.alpha(t)), float(self.noise.sigma(t))
        return (x - a * self.denoise(x, t)) / s

    def solve(self, x_s: torch.Tensor, t_s: float, t: float, rtol: float = 1e-12, atol: float = 1e-12) -> torch.Tensor:
        """Reference ODE solution from (x_s, t_s) to t (adaptive DOP853 in lambda)."""
        from scipy.integrate import solve_ivp

        noise = self.noise
        shape = x_s.shape
        y0 = (x_s.to(torch.float64) / float(noise.alpha(t_s))).reshape(-1).numpy()

        def rhs(lam, y):
            tt = float(noise.inverse_lambda(lam))
            x = torch.from_numpy(y * float(noise.alpha(tt))).reshape(shape)
            return (-np.exp(-lam) * self.eps(x, tt)).reshape(-1).numpy()

        lam0, lam1 = float(noise.lambda_(t_s)), float(noise.lambda_(t))
        sol = solve_ivp(rhs, (lam0, lam1), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1] * float(noise.alpha(t))).reshape(shape)
